"""The Triton kernels, one module per op (pool_l2, contrastive, lora_linear, ...).

Their source lives in the checkout's top-level `kernels/` folder (the design card's layout), which has
no `__init__.py` on purpose: a top-level importable `kernels` would shadow Hugging Face's `kernels`
package, which transformers 5.x imports whenever it builds a model, for anyone with the checkout on
sys.path (`python train.py`, pytest from the repository root). They are importable only as
`embedcore.kernels.<op>`:

- installed from a wheel, setup.py copies `kernels/*.py` into this package;
- from a checkout (editable install, or the repository on sys.path), this package's search path is
  extended to the checkout's `kernels/` folder below.
"""
import os

_here = os.path.dirname(os.path.abspath(__file__))
_checkout = os.path.dirname(os.path.dirname(_here))
_source = os.path.join(_checkout, "kernels")
# Only a checkout (setup.py beside embedcore/): in site-packages the folder next to embedcore/ named
# kernels is Hugging Face's package, never ours.
if (not os.path.isfile(os.path.join(_here, "pool_l2.py")) and os.path.isfile(os.path.join(_checkout, "setup.py"))
        and os.path.isdir(_source)):
    __path__.append(_source)  # noqa: F821 (the package's own __path__)
