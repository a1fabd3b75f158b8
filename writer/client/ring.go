package client

// ring is where in a shared buffer of size bytes the messages not yet released lie: they
// are placed one after the other, wrapping to the start when the end has no room, and freed
// in order as the writer releases them (WriteAck.released_seq).
type ring struct {
	size   int64
	head   int64  // where the next message goes, when it fits
	spans  []span // not yet released, oldest first
	closed bool   // the stream ended: nothing will be released
}

type span struct {
	seq      uint64
	off, end int64
}

// alloc places n bytes for message seq; false when there is no room until a release.
func (r *ring) alloc(seq uint64, n int64) (int64, bool) {
	if n <= 0 || n > r.size {
		return 0, false
	}
	var off int64
	switch {
	case len(r.spans) == 0:
		off = 0 // empty: start over at the beginning
	case r.head > r.spans[0].off:
		// Free: [head, size) and [0, oldest).
		if r.size-r.head >= n {
			off = r.head
		} else if r.spans[0].off >= n {
			off = 0
		} else {
			return 0, false
		}
	case r.head < r.spans[0].off:
		// Free: [head, oldest).
		if r.spans[0].off-r.head < n {
			return 0, false
		}
		off = r.head
	default:
		return 0, false // head == oldest with spans in use: full
	}
	r.spans = append(r.spans, span{seq: seq, off: off, end: off + n})
	r.head = off + n
	return off, true
}

// release frees the messages up to seq.
func (r *ring) release(seq uint64) {
	i := 0
	for i < len(r.spans) && r.spans[i].seq <= seq {
		i++
	}
	r.spans = r.spans[i:]
}
