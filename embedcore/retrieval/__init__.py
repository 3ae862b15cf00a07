"""Full-corpus retrieval pieces shared by hard-negative mining (embedcore.mine) and evaluation
(embedcore.evaluate):

    model.RetrievalModel        a Biencoder + tokenizer + prefixes, ready to embed
    encode.encode_texts         length-sorted batched encoding (sharded across ranks if asked)
    topk.blockwise_topk         exact top-k of Q @ D^T tile by tile; sharded_topk merges ranks
    hard_negatives.mine_corpus  one corpus's mining pass (mask, margin, rank window)
    metrics.compute_metrics     nDCG / MRR / Recall / MAP as sentence-transformers computes them
Ranks and collectives come from embedcore.distributed (the identity in one process).
"""
