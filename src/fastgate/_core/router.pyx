# cython: language_level=3
"""Route matching and request-path normalisation, the first two steps of every request.

``Router(entries)`` compiles ``(host, methods, pattern, priority, value)`` entries into segment
tries held in C arrays: one trie per exact host, one per wildcard suffix, one for host-less entries.
``Router.match(method, host, path)`` returns ``(value, params)`` of the winning entry, or None.
Its cost depends on the path, the host's label count and the trie depth, not on the number of routes:
static children are found through one open-addressing hash table keyed by ``(node, segment)``.

Every entry gets a rank when the router is built: its position when all entries are sorted by
(priority, host rank, path specificity, has a method list, -declaration index), best first. The
winner of a request is the matching entry with the smallest rank, so the search compares ints and
prunes any subtree whose best rank cannot beat the candidate it already has.

``normalize_path(path)`` decodes percent-encoded unreserved characters, uppercases the other
percent-encodings and removes dot segments (RFC 3986 §5.2.4); it returns None for a path the
gateway must refuse with 400, and the very same object when nothing changes.

The pure-Python oracle is ``tests/models/router_model.py``; ``tests/property/test_router.py``
checks that both agree.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy

import operator
import re

cdef object _index = operator.index
cdef object _NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
cdef object _LABELS = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
cdef object _IPV6 = re.compile(r"\[[0-9a-f:.]+\]")
cdef object _TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

cdef enum:
    # segment kinds; the values are the per-segment specificity ranks (static > param > catch-all)
    SEG_CATCHALL = 0
    SEG_PARAM = 1
    SEG_STATIC = 2
    # host kinds
    HOST_ANY = 0
    HOST_WILD = 1
    HOST_EXACT = 2
    # normalize_path keeps its output on the C stack up to this many bytes
    NORM_SMALL = 2048

cdef uint64_t FNV_OFFSET = 0xcbf29ce484222325ULL
cdef uint64_t FNV_PRIME = 0x100000001b3ULL
cdef const char* HEX_DIGITS = b"0123456789ABCDEF"


# ---------------------------------------------------------------------------------------------
# pure C helpers
# ---------------------------------------------------------------------------------------------

cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    if c >= c'A' and c <= c'Z':
        return c | 0x20
    return c


cdef inline uint64_t _step(uint64_t h, unsigned char c) noexcept nogil:
    return (h ^ c) * FNV_PRIME


cdef inline uint64_t _hash_rev(const char* p, Py_ssize_t n, bint fold) noexcept nogil:
    # FNV-1a over the bytes from last to first, so that the hash of every suffix of a host
    # comes out of one backward pass (see Router._search)
    cdef uint64_t h = FNV_OFFSET
    cdef Py_ssize_t i = n - 1
    while i >= 0:
        h = _step(h, _lower(<unsigned char>p[i]) if fold else <unsigned char>p[i])
        i -= 1
    return h


cdef inline uint64_t _mix(uint64_t h, int32_t parent) noexcept nogil:
    h ^= <uint64_t>(<uint32_t>parent) * 0x9E3779B97F4A7C15ULL
    h ^= h >> 32
    h *= 0xD6E8FEB86659FD93ULL
    h ^= h >> 32
    return h


cdef inline bint _key_eq(const char* stored, const char* key, Py_ssize_t n, bint fold) noexcept nogil:
    # `stored` is already lowercase when `fold` is set
    cdef Py_ssize_t i
    if not fold:
        return memcmp(stored, key, <size_t>n) == 0
    for i in range(n):
        if <unsigned char>stored[i] != _lower(<unsigned char>key[i]):
            return False
    return True


cdef inline void _push(Frame* f, int32_t node, int32_t nparams, Py_ssize_t pos,
                       Py_ssize_t pstart, Py_ssize_t pend) noexcept nogil:
    f.node = node
    f.nparams = nparams
    f.pos = pos
    f.pstart = pstart
    f.pend = pend


cdef inline bint _allows(const Entry* e, const int32_t* meths, int32_t method) noexcept nogil:
    cdef int32_t m
    if e.meth_count == 0:
        return True
    for m in range(e.meth_start, e.meth_start + e.meth_count):
        if meths[m] == method:                     # method == -1 (unknown) never equals an id
            return True
    return False


cdef inline int _hexval(unsigned char c) noexcept nogil:
    if c >= c'0' and c <= c'9':
        return c - c'0'
    if c >= c'A' and c <= c'F':
        return c - c'A' + 10
    if c >= c'a' and c <= c'f':
        return c - c'a' + 10
    return -1


cdef inline bint _unreserved(unsigned char c) noexcept nogil:
    return ((c >= c'A' and c <= c'Z') or (c >= c'a' and c <= c'z') or (c >= c'0' and c <= c'9')
            or c == c'-' or c == c'.' or c == c'_' or c == c'~')


cdef Py_ssize_t _normalize(const unsigned char* p, Py_ssize_t n, unsigned char* out,
                           bint* changed) noexcept nogil:
    """Write the normalised form of p[0:n] (p[0] == '/') to out; return its length, -1 if invalid.

    One pass, segment by segment: each segment is copied (percent-decoded) to the output, then
    a "." segment is dropped and a ".." segment drops itself and the segment before it. The output
    never outgrows the input (o <= i throughout), so `out` needs n bytes.
    """
    cdef Py_ssize_t i = 1, o = 0, seg, q
    cdef unsigned char c
    cdef int hi, lo
    cdef bint last
    changed[0] = False
    while True:
        out[o] = c'/'
        o += 1
        seg = o
        while i < n:
            c = p[i]
            if c == c'/':
                break
            if c < 0x21 or c >= 0x7F or c == c'#':
                return -1
            if c == c'%':
                if i + 2 >= n:
                    return -1
                hi = _hexval(p[i + 1])
                lo = _hexval(p[i + 2])
                if hi < 0 or lo < 0:
                    return -1
                c = <unsigned char>(hi * 16 + lo)
                if _unreserved(c):
                    out[o] = c
                    o += 1
                    changed[0] = True
                else:
                    out[o] = c'%'
                    out[o + 1] = <unsigned char>HEX_DIGITS[hi]
                    out[o + 2] = <unsigned char>HEX_DIGITS[lo]
                    if out[o + 1] != p[i + 1] or out[o + 2] != p[i + 2]:
                        changed[0] = True
                    o += 3
                i += 3
            else:
                out[o] = c
                o += 1
                i += 1
        last = i >= n
        if o - seg == 1 and out[seg] == c'.':
            changed[0] = True
            o = seg if last else seg - 1          # "/." -> "" (or the trailing "/" at the end)
        elif o - seg == 2 and out[seg] == c'.' and out[seg + 1] == c'.':
            changed[0] = True
            if seg == 1:
                return -1                          # ".." above the root
            q = seg - 2                            # drop the previous segment and its "/"
            while out[q] != c'/':
                q -= 1
            o = q + 1 if last else q
        if last:
            return o
        i += 1


# ---------------------------------------------------------------------------------------------
# build-time parsing (Python; runs once per config generation)
# ---------------------------------------------------------------------------------------------

cdef list _parse(pattern):
    """[(kind, static bytes, param name)] of each segment; ValueError naming the pattern."""
    cdef list segs = []
    cdef set names = set()
    cdef list parts
    cdef Py_ssize_t k
    if not isinstance(pattern, str):
        raise TypeError(f"route pattern must be a str, not {type(pattern).__name__}")
    if not pattern.startswith("/"):
        raise ValueError(f"invalid route pattern {pattern!r}: it must start with '/'")
    parts = pattern[1:].split("/")
    for k, part in enumerate(parts):
        text = b""
        name = None
        if part == "*":
            kind, name = SEG_CATCHALL, "*"
        elif len(part) >= 2 and part.startswith("{") and part.endswith("}"):
            name = part[1:len(part) - 1]               # (no negative indices: wraparound=False)
            kind = SEG_PARAM
            if name.endswith("*"):
                kind, name = SEG_CATCHALL, name[:len(name) - 1]
            if _NAME.fullmatch(name) is None:
                raise ValueError(
                    f"invalid route pattern {pattern!r}: parameter name {name!r} in segment {part!r} "
                    "must match [A-Za-z_][A-Za-z0-9_]*")
        elif "{" in part or "}" in part or "*" in part:
            raise ValueError(
                f"invalid route pattern {pattern!r}: segment {part!r} mixes text with '{{', '}}' or '*' "
                "(a parameter is a whole segment: '{name}', or as the last segment '{name*}' or '*')")
        else:
            kind = SEG_STATIC
            try:
                text = part.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"invalid route pattern {pattern!r}: not encodable as UTF-8") from None
        if kind == SEG_CATCHALL and k != len(parts) - 1:
            raise ValueError(
                f"invalid route pattern {pattern!r}: catch-all segment {part!r} must be the last segment")
        if name is not None:
            if name in names:
                raise ValueError(f"invalid route pattern {pattern!r}: duplicate parameter name {name!r}")
            names.add(name)
        segs.append((kind, text, name))
    return segs


cdef tuple _parse_host(host):
    """(HOST_ANY | HOST_WILD | HOST_EXACT, lowercase key); a wildcard's key is its suffix '.example.com'."""
    if host is None:
        return HOST_ANY, b""
    if not isinstance(host, str):
        raise TypeError(f"route host must be a str or None, not {type(host).__name__}")
    if not host.isascii():
        raise ValueError(f"invalid route host {host!r}: not ASCII (write an IDN in its punycode form)")
    h = host.lower()
    if h.startswith("*."):
        if _LABELS.fullmatch(h[2:]) is not None:
            return HOST_WILD, h[1:].encode("ascii")
        raise ValueError(
            f"invalid route host {host!r}: a wildcard host is '*.' followed by a host name, "
            "like '*.example.com'")
    if _LABELS.fullmatch(h) is not None or _IPV6.fullmatch(h) is not None:
        return HOST_EXACT, h.encode("ascii")
    if not h:
        raise ValueError(f"invalid route host {host!r}: empty (use None to match any host)")
    if "*" in h:
        raise ValueError(
            f"invalid route host {host!r}: '*' is only allowed as a whole first label, "
            "like '*.example.com' (use None to match any host)")
    raise ValueError(
        f"invalid route host {host!r}: not a host name (dot-separated labels of letters, digits, "
        "'-' and '_') or an [IPv6] literal, and without a port")


cdef tuple _parse_methods(methods):
    if isinstance(methods, (str, bytes)):
        raise TypeError(f"route methods must be a tuple of str, not a single {type(methods).__name__}")
    out = []
    for m in methods:
        if not isinstance(m, str):
            raise TypeError(f"route method must be a str, not {type(m).__name__}")
        if _TOKEN.fullmatch(m) is None:
            raise ValueError(f"invalid route method {m!r}: not an HTTP method token like 'GET'")
        out.append(m.encode("ascii"))
    return tuple(out)


class _Trie:
    """The tries while they are built, as Python lists; copied into C arrays afterwards."""

    def __init__(self):
        self.statics = []   # node -> {segment bytes: child}
        self.params = []    # node -> child or -1
        self.catches = []   # node -> child or -1
        self.ents = []      # node -> [rank], ascending

    def node(self):
        self.statics.append({})
        self.params.append(-1)
        self.catches.append(-1)
        self.ents.append([])
        return len(self.ents) - 1

    def insert(self, root, segs, rank):
        n = root
        for kind, text, _ in segs:
            if kind == SEG_STATIC:
                child = self.statics[n].get(text)
                if child is None:
                    child = self.node()
                    self.statics[n][text] = child
            elif kind == SEG_PARAM:
                child = self.params[n]
                if child < 0:
                    child = self.params[n] = self.node()
            else:
                child = self.catches[n]
                if child < 0:
                    child = self.catches[n] = self.node()
            n = child
        self.ents[n].append(rank)


def parse_pattern(pattern):
    """Names of the params of `pattern`, in order (`*` is named "*"); ValueError if it is invalid."""
    return tuple([seg[2] for seg in _parse(pattern) if seg[0] != SEG_STATIC])


cpdef object normalize_path(bytes path):
    """`path` with unreserved %HH decoded, other %hh uppercased and dot segments removed.

    None when the gateway must answer 400: no leading '/', a byte < 0x21, 0x7F, >= 0x80 or '#',
    a '%' without two hex digits, or a '..' above the root. Returns `path` itself when unchanged.
    """
    cdef const unsigned char* p
    cdef Py_ssize_t n
    cdef unsigned char small[NORM_SMALL]
    cdef unsigned char* out = small
    cdef Py_ssize_t o
    cdef bint changed = False
    if path is None:
        raise TypeError("normalize_path: path must be bytes, not None")
    p = <const unsigned char*>PyBytes_AS_STRING(path)
    n = PyBytes_GET_SIZE(path)
    if n == 0 or p[0] != c'/':
        return None
    if n > NORM_SMALL:
        out = <unsigned char*>PyMem_Malloc(<size_t>n)
        if out == NULL:
            raise MemoryError()
    try:
        o = _normalize(p, n, out, &changed)
        if o < 0:
            return None
        if not changed:
            return path
        return PyBytes_FromStringAndSize(<char*>out, o)
    finally:
        if out != small:
            PyMem_Free(out)


# ---------------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------------

@cython.final
cdef class Router:
    """Routes (method, host, path) to the value of the best matching entry (see the module doc)."""

    def __cinit__(self):
        self._nodes = NULL
        self._slots = NULL
        self._keys = NULL
        self._node_ents = NULL
        self._entries = NULL
        self._meths = NULL
        self._any_root = -1
        self._n_entries = 0
        self._values = ()
        self._bare = ()

    def __dealloc__(self):
        self._free()

    cdef void _free(self) noexcept:
        PyMem_Free(self._nodes)
        PyMem_Free(self._slots)
        PyMem_Free(self._keys)
        PyMem_Free(self._node_ents)
        PyMem_Free(self._entries)
        PyMem_Free(self._meths)
        self._nodes = NULL
        self._slots = NULL
        self._keys = NULL
        self._node_ents = NULL
        self._entries = NULL
        self._meths = NULL

    def __init__(self, entries):
        cdef list parsed = []
        cdef Py_ssize_t i, r, n, k, cap, off
        cdef int32_t root
        cdef uint64_t h
        cdef Slot* sl

        # 1. validate and rank the entries
        for i, entry in enumerate(entries):
            try:
                host, methods, pattern, priority, value = entry
            except (TypeError, ValueError):
                raise TypeError(
                    f"route entry {i} must be a 5-tuple (host, methods, pattern, priority, value), "
                    f"not {entry!r}") from None
            try:
                segs = _parse(pattern)
                hkind, hkey = _parse_host(host)
                meths = _parse_methods(methods)
                priority = _index(priority)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"route entry {i}: {exc}") from None
            hrank = (hkind, len(hkey)) if hkind == HOST_WILD else (hkind, 0)
            spec = tuple([kind for kind, _, _ in segs])
            key = (priority, hrank, spec, 1 if meths else 0, -i)
            parsed.append((key, hkind, hkey, segs, meths, value))
        parsed.sort(key=lambda e: e[0], reverse=True)      # rank = position: 0 wins every tie
        n = len(parsed)
        if n >= NO_RANK // 4:
            raise ValueError(f"too many routes ({n})")

        # 2. the tries, and everything else as Python objects
        trie = _Trie()
        any_root = -1
        exact = {}
        wild = {}
        method_ids = {}
        values = []
        bare = []
        ent_meths = []
        max_depth = 0
        for r in range(n):
            _, hkind, hkey, segs, meths, value = parsed[r]
            if hkind == HOST_ANY:
                if any_root < 0:
                    any_root = trie.node()
                root = any_root
            else:
                buckets = exact if hkind == HOST_EXACT else wild
                root = buckets.get(hkey, -1)
                if root < 0:
                    root = buckets[hkey] = trie.node()
            trie.insert(root, segs, r)
            max_depth = max(max_depth, len(segs))
            ids = []
            for m in meths:
                if m not in method_ids:
                    method_ids[m] = len(method_ids)
                ids.append(method_ids[m])
            ent_meths.append(ids)
            values.append(value)
            nparams = sum([1 for kind, _, _ in segs if kind != SEG_STATIC])
            bare.append(None if nparams else (value, ()))
        n_nodes = len(trie.ents)
        if n_nodes >= NO_RANK // 4:
            raise ValueError(f"too many route nodes ({n_nodes})")
        best = [ents[0] if ents else NO_RANK for ents in trie.ents]
        for k in range(n_nodes - 1, -1, -1):           # children are created after their parent
            for child in trie.statics[k].values():
                best[k] = min(best[k], best[child])
            for child in (trie.params[k], trie.catches[k]):
                if child >= 0:
                    best[k] = min(best[k], best[child])
        keys = []                                      # (parent, key bytes, value) of the hash table
        for k in range(n_nodes):
            for text, child in trie.statics[k].items():
                keys.append((k, text, child))
        for hkey, root in exact.items():
            keys.append((KEY_HOST_EXACT, hkey, root))
        for hkey, root in wild.items():
            keys.append((KEY_HOST_WILD, hkey, root))
        for m, mid in method_ids.items():
            keys.append((KEY_METHOD, m, mid))
        cap = 8
        while cap < 2 * len(keys):
            cap *= 2

        # 3. copy into C arrays
        self._free()
        self._n_entries = 0
        self._any_root = -1
        self._nodes = <Node*>PyMem_Malloc(<size_t>max(1, n_nodes) * sizeof(Node))
        self._slots = <Slot*>PyMem_Malloc(<size_t>cap * sizeof(Slot))
        self._keys = <char*>PyMem_Malloc(<size_t>max(1, sum([len(t) for _, t, _ in keys])))
        self._node_ents = <int32_t*>PyMem_Malloc(<size_t>max(1, n) * sizeof(int32_t))
        self._entries = <Entry*>PyMem_Malloc(<size_t>max(1, n) * sizeof(Entry))
        self._meths = <int32_t*>PyMem_Malloc(<size_t>max(1, sum([len(x) for x in ent_meths])) * sizeof(int32_t))
        if (self._nodes == NULL or self._slots == NULL or self._keys == NULL or self._node_ents == NULL
                or self._entries == NULL or self._meths == NULL):
            self._free()
            raise MemoryError()
        off = 0
        for k in range(n_nodes):
            nd = &self._nodes[k]
            nd.n_static = <int32_t>len(trie.statics[k])
            nd.param = trie.params[k]
            nd.catchall = trie.catches[k]
            nd.best = best[k]
            nd.ent_start = <int32_t>off
            nd.ent_count = <int32_t>len(trie.ents[k])
            for r in trie.ents[k]:
                self._node_ents[off] = <int32_t>r
                off += 1
        off = 0
        for r in range(n):
            self._entries[r].meth_start = <int32_t>off
            self._entries[r].meth_count = <int32_t>len(ent_meths[r])
            for mid in ent_meths[r]:
                self._meths[off] = mid
                off += 1
        self._mask = <uint64_t>(cap - 1)
        for k in range(cap):
            self._slots[k].value = -1
        off = 0
        for parent, text, child in keys:
            h = _mix(_hash_rev(text, len(text), False), parent)   # host keys are lowercase already
            k = <Py_ssize_t>(h & self._mask)
            while self._slots[k].value >= 0:
                k = (k + 1) & <Py_ssize_t>self._mask
            sl = &self._slots[k]
            sl.hash = h
            sl.key_off = off
            sl.key_len = len(text)
            sl.parent = parent
            sl.value = child
            if len(text):
                memcpy(self._keys + off, PyBytes_AS_STRING(text), <size_t>len(text))
            off += len(text)
        self._any_root = any_root
        self._has_exact = len(exact) > 0
        self._wild_min = min([len(s) for s in wild]) if wild else 0
        self._wild_max = max([len(s) for s in wild]) if wild else 0
        self._n_frames = 3 * (max_depth + 1) + 1
        self._n_params = max_depth + 1
        self._values = tuple(values)
        self._bare = tuple(bare)
        self._n_entries = n

    def __len__(self):
        return self._n_entries

    def __repr__(self):
        return f"<Router: {self._n_entries} entries>"

    cpdef object match(self, bytes method, bytes host, bytes path):
        """(value, params) of the winning entry for this request, or None."""
        if method is None or host is None or path is None:
            raise TypeError("match takes bytes method, host and path, not None")
        cdef Search s
        cdef Frame frames_small[FRAMES_SMALL]
        cdef Py_ssize_t cur_small[2 * PARAMS_SMALL]
        cdef Py_ssize_t win_small[2 * PARAMS_SMALL]
        cdef void* heap = NULL
        cdef Py_ssize_t j
        cdef tuple params
        s.path = PyBytes_AS_STRING(path)
        s.n = PyBytes_GET_SIZE(path)
        if self._slots == NULL or s.n == 0 or s.path[0] != c'/':
            return None
        if self._n_frames <= FRAMES_SMALL and self._n_params <= PARAMS_SMALL:
            s.frames = frames_small
            s.cur = cur_small
            s.win = win_small
        else:
            heap = PyMem_Malloc(<size_t>self._n_frames * sizeof(Frame)
                                + <size_t>(4 * self._n_params) * sizeof(Py_ssize_t))
            if heap == NULL:
                raise MemoryError()
            s.frames = <Frame*>heap
            s.cur = <Py_ssize_t*>(s.frames + self._n_frames)
            s.win = s.cur + 2 * self._n_params
        try:
            s.method = self._lookup(KEY_METHOD, PyBytes_AS_STRING(method), PyBytes_GET_SIZE(method), False)
            s.best = NO_RANK
            s.nwin = 0
            self._search(&s, PyBytes_AS_STRING(host), PyBytes_GET_SIZE(host))
            if s.best == NO_RANK:
                return None
            if s.nwin == 0:
                return self._bare[s.best]
            params = PyTuple_New(s.nwin)
            for j in range(s.nwin):
                item = PyBytes_FromStringAndSize(<char*>s.path + s.win[2 * j], s.win[2 * j + 1] - s.win[2 * j])
                Py_INCREF(item)
                PyTuple_SET_ITEM(params, j, item)
            return (self._values[s.best], params)
        finally:
            if heap != NULL:
                PyMem_Free(heap)

    cdef int32_t _lookup(self, int32_t parent, const char* key, Py_ssize_t n, bint fold) noexcept nogil:
        return self._lookup_hashed(parent, _mix(_hash_rev(key, n, fold), parent), key, n, fold)

    cdef int32_t _lookup_hashed(self, int32_t parent, uint64_t h, const char* key, Py_ssize_t n,
                                bint fold) noexcept nogil:
        cdef uint64_t i = h & self._mask
        cdef const Slot* sl
        while True:                                    # never full: load factor <= 1/2
            sl = &self._slots[i]
            if sl.value < 0:
                return -1
            if (sl.hash == h and sl.parent == parent and sl.key_len == n
                    and _key_eq(self._keys + sl.key_off, key, n, fold)):
                return sl.value
            i = (i + 1) & self._mask

    cdef void _search(self, Search* s, const char* host, Py_ssize_t hlen) noexcept nogil:
        """Walk every trie the host selects: exact, each wildcard suffix, any-host."""
        cdef Py_ssize_t i = hlen - 1
        cdef int32_t root
        cdef uint64_t h = FNV_OFFSET
        cdef unsigned char c
        while i >= 0 and host[i] != c':' and host[i] != c']':
            i -= 1
        if i >= 0 and host[i] == c':':                 # a ":port" after any "[v6]" literal
            hlen = i
        if hlen > 0 and self._has_exact:
            root = self._lookup(KEY_HOST_EXACT, host, hlen, True)
            if root >= 0:
                self._walk(s, root)
        if hlen > 0 and self._wild_max > 0:
            # suffixes ".b.c", ".c" of "a.b.c": one backward pass hashes them all, and it stops
            # at the longest configured suffix, so a long Host costs no more than a short one
            i = hlen - 1
            while i >= 1 and hlen - i <= self._wild_max:
                c = _lower(<unsigned char>host[i])
                h = _step(h, c)
                if c == c'.' and hlen - i >= self._wild_min:
                    root = self._lookup_hashed(KEY_HOST_WILD, _mix(h, KEY_HOST_WILD), host + i, hlen - i, True)
                    if root >= 0:
                        self._walk(s, root)
                i -= 1
        if self._any_root >= 0:
            self._walk(s, self._any_root)

    cdef void _walk(self, Search* s, int32_t root) noexcept nogil:
        """Depth-first search of one trie: static, then param, then catch-all, with backtracking.

        A node at depth d always meets path segment d, so each node is visited at most once.
        """
        cdef Frame* st = s.frames
        cdef Py_ssize_t sp = 1
        cdef Frame f
        cdef const Node* nd
        cdef const char* slash
        cdef Py_ssize_t end, nxt
        cdef int32_t child
        _push(&st[0], root, 0, 1, -1, -1)
        while sp > 0:
            sp -= 1
            f = st[sp]
            nd = &self._nodes[f.node]
            if nd.best >= s.best:                      # nothing below can beat the candidate
                continue
            if f.pstart >= 0:
                s.cur[2 * f.nparams - 2] = f.pstart
                s.cur[2 * f.nparams - 1] = f.pend
            if f.pos < 0:
                self._accept(s, nd, f.nparams)
                continue
            if nd.n_static == 0 and nd.param < 0 and nd.catchall < 0:
                continue
            slash = <const char*>memchr(s.path + f.pos, c'/', <size_t>(s.n - f.pos))
            end = s.n if slash == NULL else slash - s.path
            nxt = end + 1 if end < s.n else -1
            # pushed in reverse: the static child is searched first
            if nd.catchall >= 0:
                _push(&st[sp], nd.catchall, f.nparams + 1, -1, f.pos, s.n)
                sp += 1
            if nd.param >= 0 and end > f.pos:
                _push(&st[sp], nd.param, f.nparams + 1, nxt, f.pos, end)
                sp += 1
            if nd.n_static > 0:
                child = self._lookup(f.node, s.path + f.pos, end - f.pos, False)
                if child >= 0:
                    _push(&st[sp], child, f.nparams, nxt, -1, -1)
                    sp += 1

    cdef void _accept(self, Search* s, const Node* nd, int32_t nparams) noexcept nogil:
        """The path ends at `nd`: take its best entry that allows the method, if it beats s.best."""
        cdef int32_t k, r
        for k in range(nd.ent_start, nd.ent_start + nd.ent_count):
            r = self._node_ents[k]
            if r >= s.best:
                return
            if _allows(&self._entries[r], self._meths, s.method):
                s.best = r
                s.nwin = nparams
                memcpy(s.win, s.cur, <size_t>(2 * nparams) * sizeof(Py_ssize_t))
                return
