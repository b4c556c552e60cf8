"""Drop-in replacements for the functions of ``mamba_ssm`` and ``causal-conv1d``, built on ``ssmkit.ops``.

ssmkit's own ops are pure functions (``causal_conv1d_update`` returns the new state, its argument is
``initial_state``). Code written for the peer packages expects their exact signatures, in-place cache
updates and mixed precisions, so these modules give exactly that:

* :mod:`ssmkit.compat.mamba_ssm`      ``selective_scan_fn``, ``selective_state_update``,
  ``mamba_chunk_scan_combined`` (and their ``_ref`` twins);
* :mod:`ssmkit.compat.causal_conv1d`  ``causal_conv1d_fn``, ``causal_conv1d_update``,
  ``causal_conv1d_varlen_states`` (and their ``_ref`` twins).

Port by changing the import: ``from mamba_ssm.ops.triton.selective_state_update import
selective_state_update`` becomes ``from ssmkit.compat.mamba_ssm import selective_state_update``.
"""
