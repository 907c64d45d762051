"""NF4 quantization from scratch: the 4-bit NormalFloat code, blockwise absmax scaling, nibble packing
and double quantization, byte-for-byte equal to bitsandbytes' `quantize_4bit(..., quant_type="nf4")`.

The recipe (QLoRA, Dettmers et al. 2023, section 3):

1. flatten the weight and cut it into blocks of `blocksize` (64) numbers;
2. divide each block by its absolute maximum (`absmax`), so every number lies in [-1, 1];
3. replace each number by the index (0..15) of the nearest of the 16 NF4 code values, which sit at
   quantiles of a standard normal because trained weights are roughly normal;
4. store two indices per byte (the even-indexed element in the HIGH nibble);
5. optionally (double quantization) store the fp32 absmax values themselves in 8 bits, in blocks of
   256, after subtracting their mean.

Dequantization looks the codes up again and multiplies by the block's absmax: `dequantize_nf4` says it in
four lines. `QLoRALinear` does that on every forward pass, so large weights take `_dequantize_chunked`,
the same arithmetic arranged for speed (the tests prove the two equal bit for bit).

The state dataclass `NF4State` mirrors bitsandbytes' `QuantState` field names (`absmax`, `shape`,
`dtype`, `blocksize`, `code`, `offset`, and `state2` -> here `absmax2`/`code2`/`blocksize2`).

Lesson 03's exercises are here under their own names and signatures, most of them a few lines that call the
code above by the name it has here: `describe(dtype)`, `absmax_quantize(x)` / `absmax_dequantize(q, absmax)`
and `blockwise_quantize(x, blocksize=64)` / `blockwise_dequantize(q, absmax)` (both `absmax_int8`),
`nf4_values()` (`nf4_code`), `quantize_nf4(W, blocksize)`, `dequantize_nf4(packed, state)`,
`double_quantize(absmax, blocksize=256)` (`quantize_dynamic_8bit` after the mean is taken off, as
`quantize_nf4` does) and `bits_per_param(blocksize, double_quant)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

__all__ = ["describe", "absmax_int8", "absmax_int8_dequantize", "absmax_quantize", "absmax_dequantize",
           "blockwise_quantize", "blockwise_dequantize", "nf4_values", "double_quantize", "NF4State", "nf4_code", "nf4_midpoints", "dynamic_code",
           "quantize_nf4", "dequantize_nf4", "pack_nibbles", "unpack_nibbles", "quantize_dynamic_8bit",
           "dequantize_dynamic_8bit", "bits_per_param", "dynamic_lookup_table", "exact_dynamic_8bit", "BLOCKSIZES"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
CPU_CHUNK = 1 << 16  # packed bytes per step of dequantize_nf4 on a CPU (a 512 KiB intermediate)
# Above this many packed bytes dequantize_nf4 takes the chunked path: below it the short one is as fast
# (1 CPU thread, bf16: 78 vs 82 us at 4,096 bytes, 104 vs 86 us at 8,192).
REFERENCE_MAX_BYTES = 4096
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
OFFSET = 0.9677083  # the outermost quantile bitsandbytes uses (create_normal_map's default)


# ------------------------------------------------------------------------------- the float formats

def describe(dtype: torch.dtype) -> dict[str, float]:
    """The largest finite value ("max") and the gap between 1.0 and the next number ("eps") of a float format
    (lesson 03's first exercise), as torch.finfo reports them."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"describe takes a floating-point torch dtype (torch.bfloat16, ...); got {dtype!r}")
    info = torch.finfo(dtype)
    return dict(max=info.max, eps=info.eps)


# ------------------------------------------------------------------------------- absmax int8, the start

def absmax_int8(x: torch.Tensor, blocksize: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 quantization (lesson 03's first exercises): q = round(127 * x / absmax), one absmax for the whole
    tensor (q keeps x's shape, absmax is a scalar), or with `blocksize` one per block of that many numbers (q is
    (n_blocks, blocksize), absmax (n_blocks,)); x.numel() must then be a multiple of blocksize."""
    blocks = x.float().reshape(1 if blocksize is None else -1, -1 if blocksize is None else blocksize)
    absmax = blocks.abs().amax(dim=1)
    q = torch.round(blocks * 127 / absmax[:, None]).to(torch.int8)
    return (q.view(x.shape), absmax[0]) if blocksize is None else (q, absmax)


def absmax_int8_dequantize(q: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Undo `absmax_int8`: q * absmax / 127, per block when absmax has one value per block (flattened then)."""
    if absmax.dim() == 0:
        return q.float() * absmax / 127
    return (q.float() * absmax[:, None] / 127).reshape(-1)


# Lesson 03's exercises 2 and 3 under their names: one absmax for the whole tensor, or one per block.
def absmax_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes shaped like x and the one absmax (a scalar): `absmax_int8(x)`."""
    return absmax_int8(x)


def absmax_dequantize(q: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """q * absmax / 127, shaped like q: `absmax_int8_dequantize`."""
    return absmax_int8_dequantize(q, absmax)


def blockwise_quantize(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (n_blocks, blocksize) and one absmax per block (n_blocks,): `absmax_int8(x, blocksize)`."""
    return absmax_int8(x, blocksize)


def blockwise_dequantize(q: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Each block's codes times its absmax / 127, flattened: `absmax_int8_dequantize`."""
    return absmax_int8_dequantize(q, absmax)


# ----------------------------------------------------------------------------------------- the codes

@lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    # Asymmetric on purpose: 8 positive and 7 negative quantiles plus an exact 0, so that zero (padding,
    # pruned weights) is representable. Evenly spaced probabilities from OFFSET down towards 0.5; the
    # last point (0.5, i.e. 0.0) is dropped on both sides and a single 0 added instead. The probabilities
    # are made in fp32 like bitsandbytes' torch.linspace, the quantiles in fp64 like scipy's norm.ppf.
    pos = torch.special.ndtri(torch.linspace(OFFSET, 0.5, 9)[:-1].double())        # 8 values > 0
    neg = -torch.special.ndtri(torch.linspace(OFFSET, 0.5, 8)[:-1].double())       # 7 values < 0
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return values / values.max()                                                   # (16,) in [-1, 1]


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values, index 0 (-1.0) to 15 (1.0), fp32, derived from normal quantiles."""
    return _nf4_code_cpu().to(device or "cpu")


def nf4_values() -> torch.Tensor:
    """The 16 NF4 values on the CPU (lesson 03's exercise 4): `nf4_code()`, copied, so that changing the result
    in place leaves the cached table alone."""
    return nf4_code().clone()


def nf4_midpoints(device=None) -> torch.Tensor:
    """The 15 boundaries between neighbouring NF4 values: a number goes to code i when it is strictly
    greater than exactly i of them (a number exactly on a boundary takes the lower code)."""
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2                                              # (15,)


@lru_cache(maxsize=None)
def _dynamic_code_cpu() -> torch.Tensor:
    # bitsandbytes' signed "dynamic" 8-bit map (Dettmers 2015): for each decade 1e-6 .. 1 a run of
    # linearly spaced fractions, finer near 1; 127 positive, 127 negative values, plus 0 and 1.
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-6 + i) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(data + [0.0, 1.0]), dtype=torch.float32)            # (256,)


def dynamic_code(device=None) -> torch.Tensor:
    """The 256-value signed dynamic map double quantization uses (bitsandbytes' create_dynamic_map())."""
    return _dynamic_code_cpu().to(device or "cpu")


# ----------------------------------------------------------------------------------------- the state

@dataclass
class NF4State:
    """Everything needed to undo `quantize_nf4` (the counterpart of bitsandbytes' QuantState).

    Without double quantization `absmax` is fp32 of shape (n_blocks,). With it, `absmax` holds uint8
    codes into `code2`, one per block, and the real absmax is
    `code2[absmax] * absmax2[block // blocksize2] + offset` (see `absmax_fp32()`).
    """
    absmax: torch.Tensor                  # (n_blocks,) fp32, or uint8 codes when double quantized
    shape: torch.Size                     # the original weight's shape
    dtype: torch.dtype                    # the original weight's dtype (the default output dtype)
    blocksize: int = 64
    code: torch.Tensor | None = None      # (16,) the NF4 values
    offset: torch.Tensor | None = None    # () fp32 mean of the absmax values (double quantization)
    absmax2: torch.Tensor | None = None   # (ceil(n_blocks / blocksize2),) fp32 second-level absmax
    code2: torch.Tensor | None = None     # (256,) the dynamic 8-bit map
    blocksize2: int = 256

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block absmax in fp32, dequantizing the 8-bit codes when double quantized."""
        if not self.double_quant:
            return self.absmax
        return dequantize_dynamic_8bit(self.absmax, self.absmax2, self.code2, self.blocksize2) + self.offset

    def to(self, device) -> "NF4State":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, absmax=move(self.absmax), code=move(self.code), offset=move(self.offset),
                       absmax2=move(self.absmax2), code2=move(self.code2))

    def nbytes(self) -> int:
        """Bytes of quantization constants (absmax, offset, second-level absmax), codes excluded."""
        return sum(t.numel() * t.element_size() for t in (self.absmax, self.offset, self.absmax2) if t is not None)


# ------------------------------------------------------------------------------------------- helpers

def _check(W: torch.Tensor, blocksize: int) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in FLOATS:
        raise ValueError(f"NF4 quantizes float32, float16 or bfloat16 weights, got {W.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (what bitsandbytes supports), got {blocksize}")
    if W.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")


def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a flat tensor into full blocks (n_full, blocksize) and the partial last block (or None)."""
    full = x.numel() - x.numel() % blocksize
    return x[:full].view(-1, blocksize), (x[full:] if full < x.numel() else None)


def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, the even-indexed one in the high nibble; an odd count is padded
    with index 7 (the NF4 code for 0.0). Returns uint8 of shape (ceil(n/2), 1) like bitsandbytes."""
    idx = idx.reshape(-1).to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_full((1,), 7)])
    return ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)                              # (ceil(n/2), 1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_nibbles`: n indices (int64) in the original order."""
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()   # (n,)


# ----------------------------------------------------------------------------- 4-bit NF4 quantization

def quantize_nf4(W: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> tuple[torch.Tensor, NF4State]:
    """Quantize W to NF4: returns (packed uint8 of shape (ceil(n/2), 1), NF4State).

    Bit-exact with `bitsandbytes.functional.quantize_4bit(W, blocksize=blocksize, quant_type="nf4",
    compress_statistics=double_quant)` on CPU.
    """
    _check(W, blocksize)
    x = W.detach().reshape(-1).float()                                             # (n,) fp32
    full, rest = _blocks(x, blocksize)
    absmax = full.abs().amax(dim=1)                                                # (n_full,)
    if not (torch.isfinite(absmax).all() and (rest is None or torch.isfinite(rest).all())):  # amax keeps NaN
        raise ValueError("the weight contains NaN or inf; its block's absmax would be meaningless "
                         "(bitsandbytes silently writes codes that dequantize to NaN for the whole block)")
    # Full blocks multiply by 1/absmax (what bitsandbytes does, and faster than dividing); an all-zero
    # block gets a tiny divisor so 0/0 never happens, and its absmax stays 0.
    scaled = (full * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).view(-1)
    if rest is not None:
        # bitsandbytes' CPU path treats the partial last block separately: it divides by its absmax
        # (a different rounding than multiplying by the reciprocal) and stores the clamped divisor.
        last = rest.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, (rest / last).clamp(-1, 1)])
    idx = torch.bucketize(scaled, nf4_midpoints(x.device), out_int32=True)          # (n,) 0..15
    packed = pack_nibbles(idx)
    state = NF4State(absmax=absmax, shape=W.shape, dtype=W.dtype, blocksize=blocksize, code=nf4_code(x.device))
    if double_quant:
        codes, absmax2, offset = double_quantize(absmax)
        state = replace(state, absmax=codes, offset=offset, absmax2=absmax2, code2=dynamic_code(x.device))
    return packed, state


def _check_state(packed: torch.Tensor, state) -> None:
    if not isinstance(state, NF4State):
        kind = type(state).__name__
        hint = (" That is bitsandbytes' own state: undo its quantize_4bit with "
                "bitsandbytes.functional.dequantize_4bit(packed, quant_state), or quantize with "
                "lorakit.nf4.quantize_nf4 to get an NF4State." if kind == "QuantState" else "")
        raise TypeError(f"dequantize_nf4 needs the NF4State that quantize_nf4 returned with the packed bytes; "
                        f"got {kind}.{hint}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"packed NF4 data must be uint8, got "
                         f"{packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__}")
    if packed.numel() != -(-state.numel // 2):
        raise ValueError(f"{packed.numel()} packed bytes do not hold the {state.numel} numbers of a weight of shape "
                         f"{tuple(state.shape)} (two per byte): pass the bytes and the state of the same quantize_nf4 call")


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo `quantize_nf4`: each number is its code value times its block's absmax, in fp32, then cast to
    `dtype` (default: the original dtype). The code values are the state's own table (`state.code`).
    Equal bit for bit to bitsandbytes' `dequantize_4bit` (which returns 1-D weights as shape (1, n); this
    returns the original shape)."""
    _check_state(packed, state)
    dtype = dtype or state.dtype
    if packed.numel() > REFERENCE_MAX_BYTES:  # the same numbers, faster for large weights (_dequantize_chunked)
        return _dequantize_chunked(packed, state, dtype)
    n, bs = state.numel, state.blocksize
    index = unpack_nibbles(packed, n)                                              # (n,) 0..15
    values = _code(state, packed.device)[index]                                    # (n,) fp32 in [-1, 1]
    absmax = state.absmax_fp32().repeat_interleave(bs)[:n]                        # (n,) each block's absmax
    return (values * absmax).to(dtype).view(state.shape)


def _code(state: NF4State, device) -> torch.Tensor:
    """The state's code table (16 fp32 values), or the NF4 code for a state built without one."""
    return (nf4_code(device) if state.code is None else state.code.to(device)).float()


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    # Every byte value 0..255 decoded to its (high, low) pair of code values, the pair stored as one
    # 8-byte word: one gather per byte instead of two shifts, two masks and two gathers.
    b = torch.arange(256, device=code.device)
    pairs = torch.stack([code[b >> 4], code[b & 0xF]], dim=1)                      # (256, 2) fp32
    return pairs.contiguous().view(torch.int64).view(-1)                           # (256,) 8-byte words


def _dequantize_chunked(packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_nf4` for large weights, bit for bit the same numbers: a byte decodes to its two code values
    with one lookup, and on a CPU the work goes through chunks of CPU_CHUNK packed bytes (64 KiB) so that the
    intermediate stays in the L2 cache (memory traffic, not arithmetic, is the cost here); on a GPU, all at
    once. Smaller chunks cost more in per-call overhead than they save: 16 KiB took 25 ms on 4096x4096 bf16,
    64 KiB 15 ms."""
    n, bs = state.numel, state.blocksize
    absmax = state.absmax_fp32()                                                   # (n_blocks,) fp32
    table = _byte_table(_code(state, packed.device))
    flat = packed.reshape(-1)                                                      # (ceil(n/2),)
    n_full = n // bs * bs // 2                                                     # bytes in full blocks
    out = torch.empty(2 * flat.numel(), dtype=dtype, device=packed.device)
    step = CPU_CHUNK if packed.device.type == "cpu" else max(n_full, 1)
    index = torch.empty(min(step, n_full), dtype=torch.int32, device=packed.device)
    buffer = torch.empty(min(step, n_full), dtype=torch.int64, device=packed.device)
    for start in range(0, n_full, step):
        chunk = flat[start:min(start + step, n_full)]
        k = chunk.numel()
        words = torch.index_select(table, 0, index[:k].copy_(chunk), out=buffer[:k])
        values = words.view(torch.float32).view(-1, bs)                            # (blocks in chunk, bs)
        scale = absmax[2 * start // bs: 2 * start // bs + values.shape[0]].unsqueeze(1)
        target = out[2 * start: 2 * start + values.numel()].view(-1, bs)
        if dtype == torch.float32:
            torch.mul(values, scale, out=target)
        else:  # the fp32 product, then one rounding (faster than torch.mul into a 16-bit out=)
            target.copy_(values.mul_(scale))
    if n_full < flat.numel():                                                      # the partial last block
        values = table[flat[n_full:].long()].view(torch.float32)
        out[2 * n_full:].copy_(values * absmax[-1])
    return out[:n].view(state.shape)


# --------------------------------------------------------------------- 8-bit double quantization

@lru_cache(maxsize=None)
def _lookup_table_cpu() -> torch.Tensor:
    # bitsandbytes' CPU kernel does not search the 256 codes for every number: it cuts [-1, 1] into
    # 65,536 evenly spaced points once and stores the nearest code of each (the number of code
    # midpoints strictly below the point). A number is then rounded to its nearest point and looked up.
    code = _dynamic_code_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0      # (65536,) fp32
    return torch.bucketize(grid, midpoints).to(torch.uint8)                      # (65536,) codes


def dynamic_lookup_table(device=None) -> torch.Tensor:
    """The 65,536-entry table bitsandbytes' CPU kernel maps to dynamic codes with: entry i is the
    nearest code of the grid point -1 + 2i/65535 (uint8)."""
    return _lookup_table_cpu().to(device or "cpu")


def _scaled_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x flattened, zero-padded to whole blocks and divided by each block's absmax: (n_blocks, blocksize)
    in [-1, 1], the absmax (n_blocks,), and n. An all-zero block stays zero."""
    x = x.reshape(-1).float()
    n = x.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)                                              # (n_blocks,)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))          # all-zero block -> code 0
    return (padded * inv.unsqueeze(1)).clamp_(-1, 1), absmax, n


def quantize_dynamic_8bit(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with the dynamic map, as bitsandbytes' `quantize_blockwise` does on
    CPU (through a 65,536-entry lookup table). Returns (uint8 codes like x, fp32 absmax per block)."""
    scaled, absmax, n = _scaled_blocks(x, blocksize)
    grid_idx = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32)              # nearest grid point
    codes = dynamic_lookup_table(x.device)[grid_idx.long()]
    codes[absmax == 0] = 0
    return codes.view(-1)[:n], absmax


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of NF4's per-block absmax (lesson 03's exercise 7, bitsandbytes'
    compress_statistics=True): their mean is taken off (the absmax values are all positive, the dynamic map is
    signed), the rest quantized to 8 bits in blocks of `blocksize`. Returns (uint8 codes, fp32 second-level
    absmax per block, the fp32 offset)."""
    offset = absmax.float().mean()
    codes, absmax2 = quantize_dynamic_8bit(absmax.float() - offset, blocksize)
    return codes, absmax2, offset


def dequantize_dynamic_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                            blocksize: int = 256) -> torch.Tensor:
    """Inverse of `quantize_dynamic_8bit`: fp32 code value times the block's absmax."""
    code = dynamic_code(codes.device) if code is None else code
    values = code[codes.reshape(-1).long()]
    n = values.numel()
    return values * absmax.repeat_interleave(blocksize)[:n]


def exact_dynamic_8bit(x: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """The exact nearest dynamic code of each number (no lookup table): for comparison with the CPU path."""
    scaled, _, n = _scaled_blocks(x, blocksize)
    code = dynamic_code(x.device)
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8).view(-1)[:n]


# ------------------------------------------------------------------------------------ bookkeeping

def bits_per_param(blocksize: int = 64, double_quant: bool = False, blocksize2: int = 256) -> float:
    """Storage per weight: 4 bits of code plus the quantization constants spread over their block:
    one fp32 absmax per block (32/64 = 0.5), or with double quantization an 8-bit absmax per block
    plus one fp32 absmax per `blocksize2` blocks (8/64 + 32/(64*256) = 0.127)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
    return 4 + 32 / blocksize
