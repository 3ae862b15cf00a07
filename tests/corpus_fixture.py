"""Corpus-ID training data for the data-layer tests: a corpus folder (merlin_metadata.json with
optional instructions + train.jsonl) and the corpus-ID JSON that trains on it, built from the
topic words of train_fixture so that the tiny Llama can learn a little from a few steps."""
import json
import os
import random

from train_fixture import TOPICS


def write_corpus(folder: str, corpus_id: str, docs: dict, **instructions) -> str:
    """docs {id: text}; instructions: query_instruction= / passage_instruction= (omitted when None)."""
    os.makedirs(folder, exist_ok=True)
    meta = {"class": "TextQADataset", "corpus_id": corpus_id}
    meta.update({k: v for k, v in instructions.items() if v is not None})
    with open(os.path.join(folder, "merlin_metadata.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        for doc_id, text in docs.items():
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return folder


def write_topic_corpus_data(root: str, corpus_id: str, n: int, seed: int = 0, negatives: int = 2,
                            **instructions) -> str:
    """A corpus-ID JSON file with n examples over its own corpus (one positive document per
    example, negatives from other topics); returns the JSON path."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    docs, rows = {}, []
    for i in range(n):
        topic = names[i % len(names)]
        docs[f"{corpus_id}_p{i}"] = " ".join(rng.sample(TOPICS[topic].split(), 6))
        negs = []
        for j in range(negatives):
            other = TOPICS[rng.choice([t for t in names if t != topic])].split()
            docs[f"{corpus_id}_n{i}_{j}"] = " ".join(rng.sample(other, 6))
            negs.append({"id": f"{corpus_id}_n{i}_{j}"})
        rows.append({"question_id": f"{corpus_id}_q{i}", "question": " ".join(rng.sample(TOPICS[topic].split(), 3)),
                     "corpus_id": corpus_id, "pos_doc": [{"id": f"{corpus_id}_p{i}"}], "neg_doc": negs})
    folder = write_corpus(os.path.join(root, f"corpus_{corpus_id}"), corpus_id, docs, **instructions)
    path = os.path.join(root, f"{corpus_id}.json")
    with open(path, "w") as f:
        json.dump({"corpus": [{"path": os.path.basename(folder)}], "data": rows}, f)
    return path
