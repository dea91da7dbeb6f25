# cython: language_level=3
# The router's interface: C structs for the hot data, the Router's typed fields and its
# cdef signatures (all pure C: `noexcept nogil`, no Python objects touched).
from libc.stdint cimport int32_t, uint64_t


cdef enum:
    NO_RANK = 0x7FFFFFFF        # "no candidate yet": every real rank is smaller
    KEY_HOST_EXACT = -2         # hash-table "parent" of exact host keys (lowercase host)
    KEY_HOST_WILD = -3          # ... of wildcard suffix keys (".example.com")
    KEY_METHOD = -4             # ... of method names
    FRAMES_SMALL = 128          # match() keeps its DFS stack on the C stack up to this size...
    PARAMS_SMALL = 40           # ...and this many captured params; deeper tries use the heap


cdef struct Node:
    int32_t n_static            # static children (found through the hash table, keyed by (node, segment))
    int32_t param               # child reached by a `{name}` segment, or -1
    int32_t catchall            # leaf reached by `*` / `{name*}`, or -1
    int32_t best                # smallest entry rank in this subtree (NO_RANK when empty): prunes the search
    int32_t ent_start           # entries ending here: _node_ents[ent_start:ent_start + ent_count],
    int32_t ent_count           # sorted by rank (best first)


cdef struct Slot:               # one open-addressing slot of the edge/host/method hash table
    uint64_t hash               # full hash, already mixed with `parent`
    Py_ssize_t key_off          # key bytes: _keys[key_off:key_off + key_len]
    Py_ssize_t key_len
    int32_t parent              # node id, or KEY_HOST_EXACT / KEY_HOST_WILD / KEY_METHOD
    int32_t value               # child node / trie root / method id; -1 = empty slot


cdef struct Entry:              # indexed by rank (0 = the entry that wins every tie)
    int32_t meth_start          # method ids: _meths[meth_start:meth_start + meth_count]
    int32_t meth_count          # 0 = any method


cdef struct Frame:              # one pending node of the depth-first search
    int32_t node
    int32_t nparams             # params captured on the way to `node`, the edge into it included
    Py_ssize_t pos              # start of the next path segment, or -1 once the path is consumed
    Py_ssize_t pstart           # value span of the param edge into `node`; pstart = -1 otherwise
    Py_ssize_t pend


cdef struct Search:             # the state of one match() call
    const char* path
    Py_ssize_t n
    int32_t method              # method id, -1 when no entry lists this method
    int32_t best                # best rank found so far
    int32_t nwin                # number of params of the best candidate
    Frame* frames
    Py_ssize_t* cur             # (start, end) pairs of the params on the current search path
    Py_ssize_t* win             # ... of the best candidate


cdef class Router:
    cdef Node* _nodes
    cdef Py_ssize_t _n_nodes
    cdef Slot* _slots
    cdef uint64_t _mask         # slot count - 1 (a power of two, at most half full)
    cdef char* _keys
    cdef int32_t* _node_ents
    cdef Entry* _entries
    cdef int32_t* _meths
    cdef int32_t _any_root      # trie of host-less entries, or -1
    cdef bint _has_exact
    cdef Py_ssize_t _wild_min   # shortest / longest wildcard suffix (0 = no wildcard hosts)
    cdef Py_ssize_t _wild_max
    cdef Py_ssize_t _n_frames   # DFS stack size and param slots one search can need
    cdef Py_ssize_t _n_params
    cdef Py_ssize_t _n_entries
    cdef tuple _values          # value of each entry, by rank
    cdef tuple _bare            # prebuilt (value, ()) by rank for entries without params, else None

    cpdef object match(self, bytes method, bytes host, bytes path)
    cdef void _free(self) noexcept
    cdef int32_t _lookup(self, int32_t parent, const char* key, Py_ssize_t n, bint fold) noexcept nogil
    cdef int32_t _lookup_hashed(self, int32_t parent, uint64_t h, const char* key, Py_ssize_t n,
                                bint fold) noexcept nogil
    cdef void _search(self, Search* s, const char* host, Py_ssize_t hlen) noexcept nogil
    cdef void _walk(self, Search* s, int32_t root) noexcept nogil
    cdef void _accept(self, Search* s, const Node* nd, int32_t nparams) noexcept nogil


cpdef object normalize_path(bytes path)
