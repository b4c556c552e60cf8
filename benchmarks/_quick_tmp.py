import sys, torch
sys.path.insert(0, "src")
from triton.testing import do_bench
from ssmkit.layers import Mamba
from ssmkit.ops.conv1d import causal_conv1d
torch.manual_seed(0)
layer = Mamba(1024, d_state=16).cuda(); layer.backend = "triton"
x = torch.randn(8, 8192, 1024, device="cuda", requires_grad=True); g = torch.randn_like(x)
def f():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return layer(x)
def fb():
    f().backward(g)
with torch.no_grad(): print("mamba layer fwd ms", do_bench(f, rep=30))
print("mamba layer fwd+bwd ms", do_bench(fb, rep=30, grad_to_none=[x]))
for b, L in ((1, 32768), (8, 8192), (8, 32768)):
    xx = torch.randn(b, 4096, L, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bb = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(xx)
    def cf(): return causal_conv1d(xx, w, bb, activation="silu", backend="triton")
    def cfb(): cf().backward(gy)
    with torch.no_grad(): t1 = do_bench(cf, rep=30)
    print(f"conv b{b} L{L} fwd {t1:.3f} ms fwd+bwd {do_bench(cfb, rep=30, grad_to_none=[xx, w, bb]):.3f} ms")
