"""A tiny seeded AR "image" model over a small enumerable token space, for exactness tests and examples.

``ToyARAdapter(vocab=6, grid=(1, 5))`` is a 2-layer causal transformer conditioned on a class label (with a
null class for classifier-free guidance). Its session recomputes the full sequence at every call (no KV cache
to get wrong), so it is the oracle for decoders: :meth:`ToyARAdapter.joint_distribution` enumerates the exact
distribution of every token sequence under a :class:`~mmfast.models.argen.Sampling` setting.
"""

from __future__ import annotations

import itertools

import torch
from PIL import Image
from torch import nn

from mmfast.errors import InvalidInputError
from mmfast.models.argen import ARGenAdapter, ARGenSession, Sampling


class _ToyNet(nn.Module):
    def __init__(self, vocab: int, length: int, classes: int, dim: int = 32, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.cls = nn.Embedding(classes + 1, dim)  # last row: the null class
        self.pos = nn.Embedding(length + 1, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """cond (B,), tokens (B, T) → logits (B, T + 1, V); row t predicts token t."""
        x = torch.cat([self.cls(cond)[:, None], self.tok(tokens)], dim=1)
        x = x + self.pos.weight[: x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.body(x, mask=mask, is_causal=True))


class _ToySession(ARGenSession):
    def __init__(self, adapter: ToyARAdapter, labels: list[int], sampling: Sampling):
        self.adapter, self.batch = adapter, len(labels)
        cond = torch.tensor(labels)
        self.cond = torch.cat([cond, torch.full_like(cond, adapter.num_classes)]) if sampling.cfg else cond
        self.seq = torch.zeros(len(self.cond), 0, dtype=torch.long)

    @property
    def length(self) -> int:
        return self.seq.shape[1]

    def prefill(self) -> torch.Tensor:
        return self.adapter.net(self.cond, self.seq)[:, -1:]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if int(positions[0]) != self.length:
            raise InvalidInputError("the toy session takes tokens at consecutive positions only")
        rep = 2 if len(self.cond) == 2 * self.batch else 1
        self.seq = torch.cat([self.seq, tokens.repeat(rep, 1)], dim=1)
        return self.adapter.net(self.cond, self.seq)[:, -tokens.shape[1] :]

    def truncate(self, n: int) -> None:
        self.seq = self.seq[:, :n]


class ToyARAdapter(ARGenAdapter):
    """A random (seeded) class-conditional AR model with ``vocab`` tokens on a ``grid``."""

    family = "toy"

    def __init__(self, vocab: int = 6, grid: tuple[int, int] = (1, 5), num_classes: int = 2, seed: int = 0, sharpness: float = 3.0):
        super().__init__()
        self.grid, self.codebook_size, self.num_classes = grid, vocab, num_classes
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = _ToyNet(vocab, grid[0] * grid[1], num_classes).eval()
            self.net.head.weight.data *= sharpness  # peakier distributions: more realistic acceptance rates
            self._codebook = torch.randn(vocab, 4)

    def session(self, conditions: list[int], sampling: Sampling) -> _ToySession:
        return _ToySession(self, conditions, sampling)

    def parse_conditions(self, conditions: object) -> list[int]:
        labels = super().parse_conditions(conditions)
        if not all(isinstance(c, int) and 0 <= c < self.num_classes for c in labels):
            raise InvalidInputError(f"toy labels are integers in [0, {self.num_classes}).")
        return labels

    def codebook_embeddings(self) -> torch.Tensor:
        return self._codebook

    def token_embeddings(self) -> torch.Tensor:
        return self.net.tok.weight.detach()

    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        palette = torch.linspace(0, 255, self.codebook_size).to(torch.uint8)
        grids = palette[tokens].reshape(-1, *self.grid)
        return [Image.fromarray(g.numpy()).convert("RGB") for g in grids]

    @torch.inference_mode()
    def joint_distribution(self, label: int, sampling: Sampling) -> dict[tuple[int, ...], float]:
        """Exact probability of every token sequence (enumerated; only for tiny vocab x length)."""
        n, v = self.num_tokens, self.codebook_size
        if v**n > 200_000:
            raise InvalidInputError("too many sequences to enumerate")
        seqs = torch.tensor(list(itertools.product(range(v), repeat=n)))
        cond = torch.full((len(seqs),), label)
        if sampling.cfg:
            logits = self.net(torch.cat([cond, torch.full_like(cond, self.num_classes)]), seqs.repeat(2, 1))
        else:
            logits = self.net(cond, seqs)
        probs = self.target_probs(logits[:, :-1], sampling)  # (S, n, V): row t predicts token t
        p = probs.gather(-1, seqs[..., None]).squeeze(-1).prod(-1)
        return {tuple(s.tolist()): float(q) for s, q in zip(seqs, p)}


TOY_PATCH_NUMS = [1, 2, 3, 4, 6, 8]


def toy_var_pair(seed: int = 0, vae_seed: int = 0) -> tuple[ARGenAdapter, ARGenAdapter]:
    """A random VAR drafter (2 blocks, width 32) + refiner (1 block, width 16) sharing one toy VQ-VAE (64 codes,
    scales 1-2-3-4-6-8, 32 px images), for CoDe tests and app smoke tests. Weights are jittered after the official
    initialisation so every adaLN block changes the logits."""
    from mmfast.models.var import VAR, VQVAE, VARAdapter, VARConfig, VQVAEConfig

    torch.manual_seed(vae_seed)
    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, norm_groups=4,
                            using_sa=False, v_patch_nums=TOY_PATCH_NUMS)).eval()
    out = []
    for i, (depth, dim) in enumerate(((2, 32), (1, 16))):
        torch.manual_seed(seed + 1 + i)
        m = VAR(VARConfig(num_classes=10, depth=depth, embed_dim=dim, num_heads=2, patch_nums=TOY_PATCH_NUMS,
                          vocab_size=64, z_channels=8))
        m.init_weights()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out.append(VARAdapter(m.eval(), vae, recommended={"guidance_scale": 1.5}))
    return out[0], out[1]
