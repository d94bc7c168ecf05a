"""Ed25519 signature verification (RFC 8032) and the SHA-512 it needs, in plain MicroPython.

Only verification: the terminal checks the fleet's content signature and never signs.  Big
integers do the field arithmetic (2**255 - 19), points use extended twisted-Edwards
coordinates, and ``[S]B - [k]A`` is computed in one double-and-add pass (Shamir's trick).
The result is re-encoded and compared with the signature's R bytes, so a non-canonical R can
never match.

Imported lazily by ``terminal.content`` and dropped from ``sys.modules`` after use: the
constants and the SHA-512 round table cost heap only while a package is being verified.
The SHA-512 round constants are derived (fractional bits of square and cube roots of the
first primes, as FIPS 180-4 defines them) instead of being stored as 88 big literals.
"""

_M64 = 0xFFFFFFFFFFFFFFFF
P = 2 ** 255 - 19
L = 2 ** 252 + 27742317777372353535851937790883648493  # order of the base point


def _primes(n):
    found = []  # type: list
    k = 2
    while len(found) < n:
        if all(k % q for q in found if q * q <= k):
            found.append(k)
        k += 1
    return found


def _iroot(n, e):
    """floor(n ** (1/e)) for a non-negative integer ``n`` and e = 2 or 3 (Newton)."""
    x = 1
    while x ** e <= n:
        x <<= 1  # an upper bound: Newton then decreases monotonically to the root
    while True:
        y = ((e - 1) * x + n // x ** (e - 1)) // e
        if y >= x:
            return x
        x = y


def _sha512_tables():
    primes = _primes(80)
    h0 = [_iroot(q << 128, 2) & _M64 for q in primes[:8]]
    k = [_iroot(q << 192, 3) & _M64 for q in primes]
    return h0, k


def _rotr(x, n):
    return ((x >> n) | (x << (64 - n))) & _M64


def sha512(data, tables=None):
    """The SHA-512 digest (64 bytes) of ``data`` (FIPS 180-4)."""
    h, k = tables or _sha512_tables()
    h = list(h)
    n = len(data)
    msg = bytearray(data)
    msg.append(0x80)
    while len(msg) % 128 != 112:
        msg.append(0)
    msg.extend((n * 8).to_bytes(16, "big"))
    w = [0] * 80
    for block in range(0, len(msg), 128):
        for t in range(16):
            w[t] = int.from_bytes(msg[block + 8 * t:block + 8 * t + 8], "big")
        for t in range(16, 80):
            x = w[t - 15]
            y = w[t - 2]
            s0 = _rotr(x, 1) ^ _rotr(x, 8) ^ (x >> 7)
            s1 = _rotr(y, 19) ^ _rotr(y, 61) ^ (y >> 6)
            w[t] = (w[t - 16] + s0 + w[t - 7] + s1) & _M64
        a, b, c, d, e, f, g, hh = h
        for t in range(80):
            t1 = (hh + (_rotr(e, 14) ^ _rotr(e, 18) ^ _rotr(e, 41))
                  + ((e & f) ^ (~e & g)) + k[t] + w[t]) & _M64
            t2 = ((_rotr(a, 28) ^ _rotr(a, 34) ^ _rotr(a, 39))
                  + ((a & b) ^ (a & c) ^ (b & c))) & _M64
            hh, g, f, e = g, f, e, (d + t1) & _M64
            d, c, b, a = c, b, a, (t1 + t2) & _M64
        for i, v in enumerate((a, b, c, d, e, f, g, hh)):
            h[i] = (h[i] + v) & _M64
    out = bytearray()
    for v in h:
        out.extend(v.to_bytes(8, "big"))
    return bytes(out)


def _inv(x):
    return pow(x, P - 2, P)


D = -121665 * _inv(121666) % P
_D2 = 2 * D % P
_SQRT_M1 = pow(2, (P - 1) // 4, P)


def _add(p1, p2):
    """Sum of two points in extended coordinates (X, Y, Z, T), curve a = -1."""
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = t1 * _D2 * t2 % P
    d = 2 * z1 * z2 % P
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _double(p1):
    x1, y1, z1, _ = p1
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1) % P
    g = a - b
    f = c + g
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def decode_point(s):
    """The point encoded in 32 bytes ``s``, or None if it is not a valid encoding."""
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= P:
        return None  # non-canonical encoding
    yy = y * y % P
    u = (yy - 1) % P
    v = (D * yy + 1) % P
    v3 = v * v * v % P
    x = u * v3 * pow(u * v3 * v3 * v % P, (P - 5) // 8, P) % P
    vxx = v * x * x % P
    if vxx == (P - u) % P:
        x = x * _SQRT_M1 % P
    elif vxx != u:
        return None  # not on the curve
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = P - x
    return (x, y, 1, x * y % P)


def encode_point(pt):
    """The 32-byte encoding of a point: y little-endian, the sign of x in the top bit."""
    x, y, z, _ = pt
    zi = _inv(z)
    x = x * zi % P
    y = y * zi % P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _base():
    return decode_point((4 * _inv(5) % P).to_bytes(32, "little"))


def verify_steps(public_key, message, signature, every=16):
    """Verify like ``verify``, as a generator: yields None after every ``every`` bits of the
    scalar loop (so an asyncio caller can let other tasks run) and finally True or False."""
    if len(public_key) != 32 or len(signature) != 64:
        yield False
        return
    a = decode_point(bytes(public_key))
    if a is None:
        yield False
        return
    r = bytes(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if s >= L:
        yield False  # RFC 8032: S must be reduced (no malleable signatures)
        return
    k = int.from_bytes(sha512(r + bytes(public_key) + bytes(message)), "little") % L
    yield None
    b = _base()
    neg_a = ((P - a[0]) % P, a[1], a[2], (P - a[3]) % P)
    both = _add(b, neg_a)
    q = (0, 1, 1, 0)  # the neutral element
    for i in range(255, -1, -1):
        q = _double(q)
        bit_s = (s >> i) & 1
        bit_k = (k >> i) & 1
        if bit_s and bit_k:
            q = _add(q, both)
        elif bit_s:
            q = _add(q, b)
        elif bit_k:
            q = _add(q, neg_a)
        if i % every == 0:
            yield None
    yield encode_point(q) == r  # [S]B - [k]A == R


def verify(public_key, message, signature):
    """True if ``signature`` (64 bytes) is ``public_key``'s (32 bytes) Ed25519 signature of
    ``message``; False for any mismatch or malformed input (never raises on bad bytes)."""
    result = None
    for step in verify_steps(public_key, message, signature):
        result = step
    return bool(result)
