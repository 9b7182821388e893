// tandem-gpu: the draft-model forward as WGSL compute kernels. Every kernel binds the
// dispatch's static parameters (binding 0: `P`, a 64-byte slot chosen by dynamic offset),
// the step's (binding 1: n tokens, first position, and — for the per-session kernels of a
// batch of sessions — the session's first row in the batch's activations) and its storage
// buffers (from binding 2
// on). `P`'s struct and the storage declarations are not written here: engine.rs generates
// them from its `#[repr(C)]` params struct and named binding list of each kernel and puts
// them before the kernel's section. Weights are GGUF blocks padded to whole
// 32-bit words; activations feeding a quantized matrix are quantized the way the CPU engine
// quantizes them (8-bit blocks of 32 or 256), so the integer parts of every dot product are
// the CPU's exactly.

struct Step { n: u32, pos: u32, last: u32, row0: u32 }

@group(0) @binding(1) var<uniform> S: Step;

// f16 bits to f32, subnormals included (drivers may flush them in unpack2x16float).
fn h2f(h: u32) -> f32 {
    let e = (h >> 10u) & 31u;
    let m = h & 1023u;
    var v: f32;
    if (e == 0u) {
        v = f32(m) * 5.9604645e-08;
    } else if (e == 31u) {
        v = bitcast<f32>(0x7f800000u | (m << 13u));
    } else {
        v = bitcast<f32>(((e + 112u) << 23u) | (m << 13u));
    }
    return select(v, -v, (h & 0x8000u) != 0u);
}

// Rounds half away from zero, as Rust's f32::round (WGSL's round() ties to even).
fn rnd(v: f32) -> f32 {
    let t = trunc(v);
    if (abs(v - t) >= 0.5) { return t + sign(v); }
    return t;
}

// Rounds to the nearest f16 (ties to even), subnormals kept: the CPU rounds block scales
// with the `half` crate, while drivers may flush f16 subnormals in pack2x16float.
fn f16r(v: f32) -> f32 {
    if (abs(v) < 6.103515625e-05) {
        return round(v * 16777216.0) / 16777216.0;
    }
    let b = bitcast<u32>(v);
    return bitcast<f32>((b + 0x0fffu + ((b >> 13u) & 1u)) & 0xffffe000u);
}

//!KERNEL formats
// Weight access shared by the matrix kernels: W holds padded blocks of one format.
fn wbyte(base: u32, b: u32) -> u32 { return (W[base + (b >> 2u)] >> ((b & 3u) * 8u)) & 0xffu; }
fn wf16(base: u32, b: u32) -> f32 {
    let w = W[base + (b >> 2u)];
    return h2f(select(w & 0xffffu, w >> 16u, (b & 2u) != 0u));
}
fn sx8(v: u32) -> i32 { return (i32(v) << 24u) >> 24u; }

//!FORMAT q8_0
const BLOCK: u32 = 32u;
const WPB: u32 = 9u;
const C256: bool = false;
fn qv(base: u32, i: u32) -> i32 { return sx8(wbyte(base, 2u + i)); }
fn deq(base: u32, i: u32) -> f32 { return wf16(base, 0u) * f32(qv(base, i)); }
fn bdot(base: u32, xo: u32, sb: u32) -> f32 {
    var s: i32 = 0;
    for (var i = 0u; i < 32u; i++) { s += qv(base, i) * XQ[xo + i]; }
    return f32(s) * (wf16(base, 0u) * XS[2u * sb]);
}

//!FORMAT q5_0
const BLOCK: u32 = 32u;
const WPB: u32 = 6u;
const C256: bool = false;
fn qh5(base: u32) -> u32 {
    return wbyte(base, 2u) | (wbyte(base, 3u) << 8u) | (wbyte(base, 4u) << 16u) | (wbyte(base, 5u) << 24u);
}
fn qv5(base: u32, qh: u32, i: u32) -> i32 {
    let j = i & 15u;
    let b = wbyte(base, 6u + j);
    let lo = select(b & 15u, b >> 4u, i >= 16u);
    return i32(lo | (((qh >> i) & 1u) << 4u)) - 16;
}
fn deq(base: u32, i: u32) -> f32 { return wf16(base, 0u) * f32(qv5(base, qh5(base), i)); }
fn bdot(base: u32, xo: u32, sb: u32) -> f32 {
    let qh = qh5(base);
    var s: i32 = 0;
    for (var i = 0u; i < 32u; i++) { s += qv5(base, qh, i) * XQ[xo + i]; }
    return f32(s) * (wf16(base, 0u) * XS[2u * sb]);
}

//!FORMAT q4_1
const BLOCK: u32 = 32u;
const WPB: u32 = 5u;
const C256: bool = false;
fn qv(base: u32, i: u32) -> i32 {
    let b = wbyte(base, 4u + (i & 15u));
    return i32(select(b & 15u, b >> 4u, i >= 16u));
}
fn deq(base: u32, i: u32) -> f32 { return f32(qv(base, i)) * wf16(base, 0u) + wf16(base, 2u); }
fn bdot(base: u32, xo: u32, sb: u32) -> f32 {
    var s: i32 = 0;
    for (var w = 0u; w < 4u; w++) {
        let word = W[base + 1u + w];
        for (var k = 0u; k < 4u; k++) {
            let b = (word >> (8u * k)) & 0xffu;
            let j = 4u * w + k;
            s += i32(b & 15u) * XQ[xo + j] + i32(b >> 4u) * XQ[xo + j + 16u];
        }
    }
    return wf16(base, 0u) * XS[2u * sb] * f32(s) + wf16(base, 2u) * XS[2u * sb + 1u];
}

//!FORMAT q4_k
const BLOCK: u32 = 256u;
const WPB: u32 = 36u;
const C256: bool = true;
fn scmin(base: u32, j: u32) -> vec2<u32> {
    if (j < 4u) {
        return vec2<u32>(wbyte(base, 4u + j) & 63u, wbyte(base, 8u + j) & 63u);
    }
    let sc = (wbyte(base, 8u + j) & 15u) | ((wbyte(base, j) >> 6u) << 4u);
    let m = (wbyte(base, 8u + j) >> 4u) | ((wbyte(base, 4u + j) >> 6u) << 4u);
    return vec2<u32>(sc, m);
}
fn qv(base: u32, i: u32) -> i32 {
    let b = wbyte(base, 16u + 32u * (i / 64u) + (i & 31u));
    return i32(select(b & 15u, b >> 4u, (i & 63u) >= 32u));
}
fn deq(base: u32, i: u32) -> f32 {
    let sm = scmin(base, i / 32u);
    let d1 = wf16(base, 0u) * f32(sm.x);
    let m1 = wf16(base, 2u) * f32(sm.y);
    return d1 * f32(qv(base, i)) - m1;
}
fn bdot(base: u32, xo: u32, sb: u32) -> f32 {
    var si: i32 = 0;
    var sm: i32 = 0;
    for (var j = 0u; j < 8u; j++) {
        let scm = scmin(base, j);
        var s: i32 = 0;
        var bs: i32 = 0;
        let qo = base + 4u + 8u * (j / 2u);
        let shift = 4u * (j & 1u);
        for (var w = 0u; w < 8u; w++) {
            let word = W[qo + w];
            for (var k = 0u; k < 4u; k++) {
                let q = i32((word >> (8u * k + shift)) & 15u);
                let x = XQ[xo + 32u * j + 4u * w + k];
                s += q * x;
                bs += x;
            }
        }
        si += i32(scm.x) * s;
        sm += i32(scm.y) * bs;
    }
    let dx = XS[sb];
    return dx * wf16(base, 0u) * f32(si) - dx * wf16(base, 2u) * f32(sm);
}

//!FORMAT q6_k
const BLOCK: u32 = 256u;
const WPB: u32 = 53u;
const C256: bool = true;
fn qv(base: u32, i: u32) -> i32 {
    let h = i / 128u;
    let r = i & 127u;
    let qd = r / 32u;
    let l = r & 31u;
    let qlb = wbyte(base, 64u * h + l + 32u * (qd & 1u));
    let lo = select(qlb & 15u, qlb >> 4u, qd >= 2u);
    let hi = (wbyte(base, 128u + 32u * h + l) >> (2u * qd)) & 3u;
    return i32(lo | (hi << 4u)) - 32;
}
fn deq(base: u32, i: u32) -> f32 {
    return wf16(base, 208u) * f32(sx8(wbyte(base, 192u + i / 16u))) * f32(qv(base, i));
}
fn bdot(base: u32, xo: u32, sb: u32) -> f32 {
    var total: i32 = 0;
    for (var g = 0u; g < 16u; g++) {
        var s: i32 = 0;
        for (var i = 0u; i < 16u; i++) {
            let e = 16u * g + i;
            s += qv(base, e) * XQ[xo + e];
        }
        total += sx8(wbyte(base, 192u + g)) * s;
    }
    return XS[sb] * wf16(base, 208u) * f32(total);
}

//!KERNEL matmul
// y[t, row0 + r] (+)= W[r, :] . x[t, :]  (+ bias). One invocation per output element.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let rows = P.rows;
    let k = P.k;
    let r = g.x;
    let t = g.y;
    if (r >= rows) { return; }
    let nb = k / BLOCK;
    let base = r * nb * WPB;
    var acc = 0.0;
    for (var b = 0u; b < nb; b++) {
        acc += bdot(base + b * WPB, t * k + b * BLOCK, t * nb + b);
    }
    let flags = P.flags;
    let col = P.row0 + r;
    if ((flags & 2u) != 0u) { acc += BIAS[col]; }
    let o = P.offset + S.pos * P.pos_stride + t * P.stride + col;
    if ((flags & 1u) != 0u) { acc = Y[o] + acc; }
    Y[o] = acc;
}

//!KERNEL embed
// h[t, :] = dequantized row tokens[t] of the embedding (when it lies in this chunk).
// XQ and XS are never read here; they are declared because the format's `bdot` names them.
@group(0) @binding(5) var<storage, read> XQ: array<i32>;
@group(0) @binding(6) var<storage, read> XS: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let d = P.d;
    let e = g.x;
    let t = g.y;
    if (e >= d) { return; }
    let id = TOK[t];
    let row0 = P.row0;
    if (id < row0 || id >= row0 + P.rows) { return; }
    let nb = d / BLOCK;
    let base = ((id - row0) * nb + e / BLOCK) * WPB;
    H[t * d + e] = deq(base, e % BLOCK);
}

//!KERNEL quant
// Quantizes rows of x to 8-bit blocks as the CPU engine does: 32-blocks (ggml Q8_0/Q8_1:
// d = amax/127, scales rounded through f16, s = d * sum q) or 256-blocks (ggml Q8_K).
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let k = P.k;
    let bs = P.block;
    let b = g.x;
    let t = g.y;
    let nb = k / bs;
    if (b >= nb) { return; }
    let o = t * k + b * bs;
    if (bs == 32u) {
        var amax = 0.0;
        for (var i = 0u; i < 32u; i++) { amax = max(amax, abs(X[o + i])); }
        let d = amax / 127.0;
        var id = 0.0;
        if (d != 0.0) { id = 1.0 / d; }
        var sum: i32 = 0;
        for (var i = 0u; i < 32u; i++) {
            let q = i32(clamp(rnd(X[o + i] * id), -128.0, 127.0));
            XQ[o + i] = q;
            sum += q;
        }
        XS[2u * (t * nb + b)] = f16r(d);
        XS[2u * (t * nb + b) + 1u] = f16r(d * f32(sum));
    } else {
        var amax = 0.0;
        var mx = 0.0;
        for (var i = 0u; i < 256u; i++) {
            let v = X[o + i];
            if (amax < abs(v)) { amax = abs(v); mx = v; }
        }
        if (amax == 0.0) {
            for (var i = 0u; i < 256u; i++) { XQ[o + i] = 0; }
            XS[t * nb + b] = 0.0;
        } else {
            let iscale = -127.0 / mx;
            for (var i = 0u; i < 256u; i++) {
                XQ[o + i] = i32(clamp(rnd(iscale * X[o + i]), -128.0, 127.0));
            }
            XS[t * nb + b] = 1.0 / iscale;
        }
    }
}

//!KERNEL rmsnorm
// out[row] = x[row] / sqrt(mean(x^2) + eps) * w. One workgroup per row; with the `last`
// parameter set, reads row n-1 and writes row 0 (the output head of a prefill).
var<workgroup> part: array<f32, 64>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let d = P.d;
    let eps = P.eps;
    var src = wg.y;
    if (P.last != 0u) { src = S.n - 1u; }
    let xo = src * d;
    let oo = wg.y * d;
    var s = 0.0;
    for (var i = li; i < d; i += 64u) { s += X[xo + i] * X[xo + i]; }
    part[li] = s;
    workgroupBarrier();
    for (var w = 32u; w > 0u; w >>= 1u) {
        if (li < w) { part[li] += part[li + w]; }
        workgroupBarrier();
    }
    let scale = 1.0 / sqrt(part[0] / f32(d) + eps);
    for (var i = li; i < d; i += 64u) { O[oo + i] = X[xo + i] * scale * NW[i]; }
}

//!KERNEL rope
// Rotary embedding in place on n rows of `heads` heads, from a cos/sin table computed on
// the CPU with the engine's formula (table[pos][i] = (cos, sin)). Rows of a KV cache
// (pos_stride ≠ 0) are placed by position; rows of activations (pos_stride 0) start at the
// step's row0.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let heads = P.heads;
    let hd = P.head_dim;
    let half = P.rope_dim / 2u;
    let neox = P.neox != 0u;
    let stride = P.stride;
    let t = g.y;
    if (g.x >= heads * half) { return; }
    let h = g.x / half;
    let i = g.x % half;
    let p = S.pos + t;
    let c = TAB[2u * (p * half + i)];
    let s = TAB[2u * (p * half + i) + 1u];
    let r = t + select(S.row0, 0u, P.pos_stride != 0u);
    let o = P.offset + S.pos * P.pos_stride + r * stride + h * hd;
    var a = 2u * i;
    var b = 2u * i + 1u;
    if (neox) { a = i; b = i + half; }
    let x0 = X[o + a];
    let x1 = X[o + b];
    X[o + a] = x0 * c - x1 * s;
    X[o + b] = x0 * s + x1 * c;
}

//!KERNEL attention
// Causal grouped-query attention, one workgroup per (head, query): keys in tiles of 64 with
// a running (online) softmax. Query t is row row0 + t of Q and O, at position pos + t.
var<workgroup> sc: array<f32, 64>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let nh = P.heads;
    let nkv = P.kv_heads;
    let hd = P.head_dim;
    let scale = P.scale;
    let h = wg.x;
    let t = wg.y;
    let kvh = h / (nh / nkv);
    let kvd = nkv * hd;
    let qo = (S.row0 + t) * nh * hd + h * hd;
    let len = S.pos + t + 1u;
    var m = -3.0e38;
    var l = 0.0;
    var acc: array<f32, 4>;
    for (var base = 0u; base < len; base += 64u) {
        let j = base + li;
        var s = -3.0e38;
        if (j < len) {
            var d = 0.0;
            let ko = j * kvd + kvh * hd;
            for (var i = 0u; i < hd; i++) { d += Q[qo + i] * K[ko + i]; }
            s = d * scale;
        }
        sc[li] = s;
        workgroupBarrier();
        let cnt = min(64u, len - base);
        var cm = m;
        for (var jj = 0u; jj < cnt; jj++) { cm = max(cm, sc[jj]); }
        let corr = exp(m - cm);
        l *= corr;
        for (var r = 0u; r < 4u; r++) { acc[r] *= corr; }
        for (var jj = 0u; jj < cnt; jj++) {
            let w = exp(sc[jj] - cm);
            l += w;
            let vo = (base + jj) * kvd + kvh * hd;
            for (var r = 0u; r < 4u; r++) {
                let dd = li + 64u * r;
                if (dd < hd) { acc[r] += w * V[vo + dd]; }
            }
        }
        m = cm;
        workgroupBarrier();
    }
    let inv = 1.0 / l;
    for (var r = 0u; r < 4u; r++) {
        let dd = li + 64u * r;
        if (dd < hd) { O[qo + dd] = acc[r] * inv; }
    }
}

//!KERNEL swiglu
// g = silu(g) * u, element-wise.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let len = P.len;
    if (g.x >= len) { return; }
    let i = g.y * len + g.x;
    let v = G[i];
    G[i] = v / (1.0 + exp(-v)) * U[i];
}

//!KERNEL argmax
// Per row of logits: the index and value of the largest (lowest index among equals) and its
// softmax probability. `mode` 0 reads row 0 (the last position's logits, computed alone),
// 1 row n − 1 of every row's logits; both write R[0..3]. Mode 2 reads every row, one
// workgroup each, and writes row t's three words at R[3t..3t + 3].
var<workgroup> bv: array<f32, 256>;
var<workgroup> bi: array<u32, 256>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let vocab = P.vocab;
    let mode = P.mode;
    var row = 0u;
    var out = 0u;
    if (mode == 1u) { row = S.n - 1u; }
    if (mode == 2u) { row = wg.y; out = 3u * wg.y; }
    let o = row * vocab;
    var best = -3.4e38;
    var idx = 0xffffffffu;
    for (var i = li; i < vocab; i += 256u) {
        let v = L[o + i];
        if (v > best) { best = v; idx = i; }
    }
    bv[li] = best;
    bi[li] = idx;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (li < w) {
            let v = bv[li + w];
            let j = bi[li + w];
            if (v > bv[li] || (v == bv[li] && j < bi[li])) { bv[li] = v; bi[li] = j; }
        }
        workgroupBarrier();
    }
    let top = bv[0];
    let top_i = bi[0];
    workgroupBarrier();
    var s = 0.0;
    for (var i = li; i < vocab; i += 256u) { s += exp(L[o + i] - top); }
    bv[li] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (li < w) { bv[li] += bv[li + w]; }
        workgroupBarrier();
    }
    if (li == 0u) {
        R[out] = top_i;
        R[out + 1u] = bitcast<u32>(top);
        R[out + 2u] = bitcast<u32>(1.0 / bv[0]);
    }
}

//!KERNEL top
// Per row t of logits, what a sampling verifier needs of it: the largest logit m, the sum z
// of exp((l − m) / T) over the row (T: the row's temperature, TEMP[t]), the logit of the
// row's next input token (the draft the row judges; meaningless for the last row), and the
// k largest logits with their ids, larger first and lower id first among equals (the order
// of f32::total_cmp, through order-preserving keys). The k-th largest key is found by a
// radix select, 8 bits a pass from the top with a histogram in workgroup memory; the keys
// above it are gathered, then the lowest ids of those equal to it, one pass each (usually
// one); a rank sort orders the k. Writes 3 + 2k words at R[(3 + 2k)·t]. k ≤ 64 ≤ vocab.
var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> pick: u32;
var<workgroup> left: u32;
var<workgroup> count: atomic<u32>;
var<workgroup> low: atomic<u32>;
var<workgroup> ev: array<f32, 64>;
var<workgroup> ei: array<u32, 64>;
var<workgroup> top: f32;
var<workgroup> zs: array<f32, 256>;

fn okey(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if ((b & 0x80000000u) != 0u) { return ~b; }
    return b | 0x80000000u;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let vocab = P.vocab;
    let k = P.k;
    let row = wg.y;
    let o = row * vocab;
    let out = row * (3u + 2u * k);
    // The k-th largest key, `prefix` once all four digits are chosen; `need` of the keys
    // equal to it belong to the k.
    var prefix = 0u;
    var mask = 0u;
    var need = k;
    for (var r = 0u; r < 4u; r++) {
        let shift = 24u - 8u * r;
        atomicStore(&hist[li], 0u);
        workgroupBarrier();
        for (var i = li; i < vocab; i += 256u) {
            let key = okey(L[o + i]);
            if ((key & mask) == prefix) { atomicAdd(&hist[(key >> shift) & 255u], 1u); }
        }
        workgroupBarrier();
        if (li == 0u) {
            var cum = 0u;
            var d = 255u;
            loop {
                let h = atomicLoad(&hist[d]);
                if (cum + h >= need || d == 0u) { break; }
                cum += h;
                d -= 1u;
            }
            pick = d;
            left = need - cum;
        }
        let d = workgroupUniformLoad(&pick);
        need = workgroupUniformLoad(&left);
        prefix |= d << shift;
        mask |= 255u << shift;
    }
    if (li == 0u) { atomicStore(&count, 0u); }
    workgroupBarrier();
    for (var i = li; i < vocab; i += 256u) {
        let v = L[o + i];
        if (okey(v) > prefix) {
            let at = atomicAdd(&count, 1u);
            ev[at] = v;
            ei[at] = i;
        }
    }
    workgroupBarrier();
    var last = 0u;
    for (var j = 0u; j < need; j++) {
        if (li == 0u) { atomicStore(&low, 0xffffffffu); }
        workgroupBarrier();
        for (var i = li; i < vocab; i += 256u) {
            if (okey(L[o + i]) == prefix && (j == 0u || i > last)) { atomicMin(&low, i); }
        }
        workgroupBarrier();
        last = atomicLoad(&low);
        if (li == 0u) {
            ev[k - need + j] = L[o + last];
            ei[k - need + j] = last;
        }
        workgroupBarrier();
    }
    if (li < k) {
        let v = okey(ev[li]);
        let id = ei[li];
        var rank = 0u;
        for (var j = 0u; j < k; j++) {
            let w = okey(ev[j]);
            if (w > v || (w == v && ei[j] < id)) { rank += 1u; }
        }
        R[out + 3u + 2u * rank] = id;
        R[out + 4u + 2u * rank] = bitcast<u32>(ev[li]);
        if (rank == 0u) { top = ev[li]; }
    }
    let m = workgroupUniformLoad(&top);
    let temp = TEMP[row];
    var s = 0.0;
    for (var i = li; i < vocab; i += 256u) { s += exp((L[o + i] - m) / temp); }
    zs[li] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (li < w) { zs[li] += zs[li + w]; }
        workgroupBarrier();
    }
    if (li == 0u) {
        R[out] = bitcast<u32>(m);
        R[out + 1u] = bitcast<u32>(zs[0]);
        var next = 0.0;
        if (row + 1u < S.n) { next = L[o + TOK[row + 1u]]; }
        R[out + 2u] = bitcast<u32>(next);
    }
}
