"""Small retrieval data built in a temp folder (no downloads); the all-MiniLM-L6-v2 fixture is in conftest.py."""
import json
import os

DOCS = [
    "The cat sat on the mat.", "Dogs are loyal pets that love long walks.", "Python is a programming language.",
    "The Eiffel Tower is in Paris.", "Bananas are rich in potassium.", "The sun is a star at the centre of the solar system.",
    "Rust is a systems programming language focused on memory safety.", "Cats often sleep for most of the day.",
    "Paris is the capital of France.", "Apples and bananas are fruits.", "Java is a language that runs on the JVM.",
    "Puppies need a lot of training.", "The moon orbits the Earth.", "Jupiter is the largest planet.",
    "Kittens are young cats.", "Berlin is the capital of Germany.", "Oranges contain vitamin C.",
    "C++ gives fine control over memory.", "Mars is called the red planet.", "Wolves are related to dogs.",
    "Tea is made from the leaves of a shrub.", "Coffee beans are roasted seeds.", "The Nile is a long river in Africa.",
    "Mount Everest is the highest mountain.", "Penguins live in the southern hemisphere.",
    "Football is played with a round ball.", "Chess is a board game for two players.",
    "The piano has 88 keys.", "Violins have four strings.", "Bread is baked from dough.",
]
QUERIES = [
    ("q0", "Where do cats like to sit?", ["d0"]), ("q1", "Which pets love walks?", ["d1", "d19"]),
    ("q2", "What is Python?", ["d2"]), ("q3", "Where is the Eiffel Tower?", ["d3", "d8"]),
    ("q4", "Which fruit has potassium?", ["d4"]), ("q5", "What is the sun?", ["d5"]),
    ("q6", "Which language focuses on memory safety?", ["d6", "d17"]), ("q7", "What is the capital of Germany?", ["d15"]),
    ("q8", "How many keys does a piano have?", ["d27"]), ("q9", "What is the highest mountain?", ["d23"]),
    ("q10", "Which planet is red?", ["d18"]), ("q11", "What drink comes from roasted seeds?", ["d21", "d20"]),
]


def write_corpus_dir(root, corpus_id="toy", docs=DOCS):
    folder = os.path.join(root, "corpus_" + corpus_id)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    with open(os.path.join(folder, "merlin_metadata.json"), "w") as f:
        json.dump({"class": "TextQADataset", "corpus_id": corpus_id}, f)
    return folder


def write_corpus_id_json(root, queries=QUERIES, name="train.json", corpus_id="toy"):
    folder = write_corpus_dir(root, corpus_id)
    data = [{"question_id": qid, "question": q, "corpus_id": corpus_id, "pos_doc": [{"id": p} for p in pos],
             "neg_doc": ["d29"] if "d29" not in pos else []} for qid, q, pos in queries]
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump({"corpus": [{"path": os.path.basename(folder)}], "data": data}, f)
    return path


def write_beir(root, split="test"):
    folder = os.path.join(root, "beir_toy")
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    with open(os.path.join(folder, "corpus.jsonl"), "w") as f:
        for i, text in enumerate(DOCS):
            f.write(json.dumps({"_id": f"d{i}", "title": "Facts" if i % 7 == 0 else "", "text": text}) + "\n")
    with open(os.path.join(folder, "queries.jsonl"), "w") as f:
        for qid, q, _ in QUERIES:
            f.write(json.dumps({"_id": qid, "text": q}) + "\n")
    with open(os.path.join(folder, "qrels", f"{split}.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, _, pos in QUERIES:
            for p in pos:
                f.write(f"{qid}\t{p}\t1\n")
    return folder
