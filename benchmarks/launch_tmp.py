"""Temporary (not committed): host cost per call of a Triton launch vs a torch op."""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, triton
from megatron_memory.kernels import key_norm as kn

keys = torch.randn(4, 2, 64, 256, device="cuda")   # small: the GPU never limits the loop
out32 = torch.empty_like(keys); outb = torch.empty(keys.shape, dtype=torch.bfloat16, device="cuda")
R, half = keys.numel() // 256, 256
grid = kn._grid(R)
def raw():
    kn._key_norm_fwd[grid](keys, out32, outb, R, half, 1e-6, half ** -0.5, BLOCK_R=kn.BLOCK_ROWS, BLOCK_D=256)
def op():
    kn.key_norm(keys, 1e-6)
def add():
    keys.add(1.0)
def empty():
    torch.empty(keys.shape, dtype=torch.float32, device="cuda")
for name, f in (("triton launch", raw), ("key_norm op (2 empty + launch + autograd)", op), ("torch add", add), ("torch empty", empty)):
    for _ in range(50): f()
    torch.cuda.synchronize()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n): f()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    print(f"{name}: {(t1 - t0) / n * 1e6:.1f} us host per call")
