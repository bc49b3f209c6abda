"""Random inputs for gated-delta-rule tests, with the decay profiles of DESIGN §6."""

import torch
import torch.nn.functional as F


def gates(B, T, HV, dtype, profile="mixed"):
    """g = -exp(A_log) * softplus(x + dt_bias) per v-head, as the GDN layer makes it.

    "mixed": head 0 has no decay (g = 0), head 1 strong decay (A = 16: in-chunk sums reach ~-1000 and
    exp underflows even in float64), the others A drawn in [1, 16]. "none": g = 0 everywhere.
    """
    if profile == "none":
        return torch.zeros(B, T, HV, dtype=dtype)
    A = torch.empty(HV, dtype=torch.float64).uniform_(1, 16)
    A[min(1, HV - 1)] = 16.0
    dt_bias = torch.empty(HV, dtype=torch.float64).uniform_(-1, 3)
    x = torch.randn(B, T, HV, dtype=torch.float64)
    g = -A * F.softplus(x + dt_bias)
    if HV > 1:
        g[..., 0] = 0.0
    return g.to(dtype)


def make_inputs(B, T, H, HV, K, V, dtype=torch.float64, profile="mixed", initial_state=True, N=None,
                requires_grad=False):
    """q, k [B,T,H,K]; v [B,T,HV,V]; g, beta [B,T,HV]; h0 [N,HV,K,V] (N defaults to B) or None."""
    q = torch.randn(B, T, H, K, dtype=dtype)
    k = torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, HV, V, dtype=dtype)
    g = gates(B, T, HV, dtype, profile)
    beta = torch.rand(B, T, HV, dtype=dtype)
    h0 = torch.randn(N or B, HV, K, V, dtype=torch.float64 if dtype == torch.float64 else torch.float32) \
        if initial_state else None
    tensors = [q, k, v, g, beta, h0]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors


def rounded_inputs(B, T, H, HV, K=128, V=128, dtype=torch.bfloat16, N=None, profile="mixed", h0=True,
                   device="cuda"):
    """make_inputs drawn in fp32 and rounded as a kernel call takes them: ([q, k, v in dtype, g fp32,
    beta in dtype] on `device`, h0 fp32 or None)."""
    q, k, v, g, beta, s0 = make_inputs(B, T, H, HV, K, V, dtype=torch.float32, profile=profile, N=N,
                                       initial_state=h0)
    low = [t.to(device, dtype) for t in (q, k, v)] + [g.to(device), beta.to(device, dtype)]
    return low, (s0.to(device) if h0 else None)


def offsets(lens, device="cuda"):
    """cu_seqlens (int64) of packed sequences of these lengths."""
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.long, device=device)


def rel(a, b):
    """Relative L2 error ||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def grads_of(fn, inputs, do, ds):
    """Gradients of sum(o * do) + sum(s * ds) wrt every tensor input that requires grad."""
    o, s = fn(*inputs)
    loss = (o.double() * do).sum() + (s.double() * ds).sum()
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    return o, s, torch.autograd.grad(loss, leaves)
