"""Block-sparse attention kernels (Triton) and their torch references -- installed as ``streamkd.kernels``.

    layout.py               the canonical layout as tensors (counts + sorted int32 block lists, both
                            directions) and ``check_layout`` (clear errors before any launch)
    reference.py            fp32 masked-dense reference with autograd (empty rows: output 0, LSE -inf)
    triton_block_sparse.py  forward (+LSE), dQ and dK/dV Triton kernels; runs under TRITON_INTERPRET=1
    ops.py                  ``streamkd::block_sparse_attn`` custom op with fake + autograd registrations
    bench.py                CPU benchmark: ``python -m streamkd.kernels.bench``

Triton is optional (``pip install 'streamkd[kernels]'``); nothing here imports it until a kernel runs.
Layout objects, mask producers and the CPU fast path live in ``streamkd.attention.sparse``.
"""
