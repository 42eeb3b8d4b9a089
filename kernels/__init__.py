"""Block-sparse attention kernels (Triton) and their torch references -- installed as
``streamkd.kernels``. Empty until the block-sparse attention issue lands."""
