"""Fine-tune a biencoder embedding model: `python train.py config.yaml [--dotted.key value ...]`.

Single process: `python train.py examples/quickstart.yaml`. Several ranks:
`torchrun --nproc-per-node=N train.py config.yaml` (gloo on CPU, nccl on CUDA).
The config's sections follow NeMo AutoModel's biencoder recipe (see embedcore/train/config/schema.py).
"""
import sys

from embedcore.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
