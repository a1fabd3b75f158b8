package manifest

import "slices"

// ChunkSizes returns the compressed size of every unit of the chunk file, in order: the
// ordinary chunks, then the delta chunks (a copy).
func (m *Manifest) ChunkSizes() []uint32 {
	return append(slices.Clone(m.h.Chunks.CompressedSizes), m.h.Chunks.DeltaSizes...)
}

// ChunkAt returns the chunk that starts at byte off of the chunk file. Only a chunk with
// bytes starts anywhere: an offset inside a chunk, past the file, or of a chunk of zeros only
// (size 0, never sent) is not found.
func (m *Manifest) ChunkAt(off uint64) (Chunk, bool) {
	if off >= m.h.Chunks.FileSize {
		return Chunk{}, false
	}
	if len(m.deltaOff) > 0 && off >= m.deltaOff[0] {
		d, found := slices.BinarySearch(m.deltaOff, off)
		if !found {
			return Chunk{}, false
		}
		return m.Delta(d), true
	}
	// The last checkpoint at or before off, then at most ckEvery chunks.
	g, found := slices.BinarySearch(m.ckOff, off)
	if !found {
		g--
	}
	// Several checkpoints may share an offset (chunks of zeros); the first chunk of bytes at
	// off is the one sent.
	for g > 0 && m.ckOff[g-1] == off {
		g--
	}
	sizes := m.h.Chunks.CompressedSizes
	o := m.ckOff[g]
	for k := g * ckEvery; k < len(sizes) && o <= off; k++ {
		if o == off && sizes[k] != 0 {
			return m.Chunk(k), true
		}
		o += uint64(sizes[k])
	}
	return Chunk{}, false
}
