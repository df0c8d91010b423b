"""``python -m lowrank_kernels``: versions, extension status and the backend of every op."""
from __future__ import annotations

import os
import sys


def main() -> int:
    import torch

    import lowrank_kernels
    from lowrank_kernels import _ext
    from lowrank_kernels.ops import _registry as reg

    print(f"lowrank_kernels {lowrank_kernels.__version__}")
    print(f"python          {sys.version.split()[0]}")
    print(f"torch           {torch.__version__}")
    try:
        import triton

        print(f"triton          {triton.__version__}")
    except Exception as e:  # pragma: no cover - machine dependent
        print(f"triton          not available ({type(e).__name__}: {e})")
    if _ext.loaded():
        print(f"C++ extension   built ({_ext.extension_path()})")
    else:
        print(f"C++ extension   not built ({_ext.load_error()})")
    cuda = torch.cuda.is_available()
    print(f"CUDA            {'available: ' + torch.cuda.get_device_name(0) if cuda else 'not available'}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}  {reg.ENV_VAR}={os.environ.get(reg.ENV_VAR, '') or '(auto)'}")
    print()
    table = reg.backend_table()
    devices = sorted({d for row in table.values() for d in row})
    width = max(len(n) for n in table) + 2
    print("op".ljust(width) + "".join(d.ljust(12) for d in devices))
    for name, row in table.items():
        print(name.ljust(width) + "".join(row.get(d, "-").ljust(12) for d in devices))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
