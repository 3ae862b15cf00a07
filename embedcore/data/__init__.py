"""Training data: readers (inline JSONL, corpus-ID JSON), the sampled dataset, a resumable
rank-aware sampler, and the biencoder collator.

    from embedcore.data.formats import load_examples, load_corpus, DataError
    from embedcore.data.dataset import RetrievalDataset
    from embedcore.data.sampler import ResumableSampler
    from embedcore.data.collator import BiencoderCollator, encode_texts
    from embedcore.data.ids import passage_uid_to_int64

Submodules are imported on use (this package imports nothing heavy by itself).
"""
