"""The reference table's closed forms (unit costs F=1, B=2, communication free)."""


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bubble(s: str, p: int, m: int, n: int, v: int) -> float:
    units = {"gpipe": m * n, "1f1b": m, "interleaved-1f1b": v * m}.get(s, v * m * n)
    return (p - 1) / (units + p - 1)


def rank0_peak(s: str, p: int, m: int, n: int, v: int) -> int:
    if s == "gpipe":
        return m * n
    if s == "1f1b" or (s == "interleaved-1f1b" and v == 1):
        return min(p, m)
    if s == "interleaved-1f1b":
        return min((v - 1) * p + 2 * (p - 1) + 1, m * v)
    if s == "looped-bfs":
        return m * v * n
    if s == "seq1f1b":
        if v == 1:
            return min(p + n - 1, m * n)
        g = n * ceil_div(p, n)  # groups of whole micro-batches; g == p where n divides p
        return min((v - 1) * g + 2 * (p - 1) + n, m * v * n)
    if s == "slimpipe":
        return min(n * v + 2 * (p - 1), m * n * v)
    raise KeyError(s)


def allowed(s: str, p: int, m: int, n: int, v: int) -> bool:
    """Where the family accepts the sizes (and, for looped BFS, where the closed form holds)."""
    if s in ("1f1b", "interleaved-1f1b") and n != 1:
        return False
    if s in ("gpipe", "1f1b") and v != 1:
        return False
    if s == "interleaved-1f1b" and v > 1 and m % p:
        return False
    if s == "seq1f1b" and v > 1 and m % ceil_div(p, n):
        return False
    if s == "slimpipe" and v > 1 and n < p:
        return False
    if s == "looped-bfs" and m * n < p:
        return False
    return True
