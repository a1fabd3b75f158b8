// Package targettest is a test kit for the writer's media: a fault-injecting target.Medium
// (write and sync errors, writes the medium acknowledges and loses, a power cut that drops
// what was not synced) and real loop devices and filesystems whose page cache can be made
// to disagree with the medium.
package targettest

import (
	"bytes"
	"errors"
	"sync"

	"github.com/gwota/gwota/writer/target"
)

// ErrPowerCut is what every call returns after PowerCut.
var ErrPowerCut = errors.New("targettest: the medium lost power")

// Medium wraps a real medium like a device with a volatile write cache: a write is held
// until Sync, which writes it to the medium underneath and syncs that. Faults are set before
// use; each hook gets the 0-based number of its call and runs without the medium's lock (it
// may call PowerCut).
type Medium struct {
	inner target.Medium

	// WriteErr, when it returns an error, fails that WriteAt (nothing is written).
	WriteErr func(n int, off int64, p []byte) error
	// LoseWrite, when it returns true, acknowledges that write and drops it: a medium that lies.
	LoseWrite func(n int, off int64, p []byte) bool
	// SyncErr, when it returns an error, fails that Sync before anything reaches the medium;
	// the writes it held are lost (Linux may drop pages whose writeback failed).
	SyncErr func(n int) error
	// AfterFlush runs once that Sync made the held writes durable, before it returns; an error
	// fails the Sync anyway (a crash between the flush and the caller seeing it succeed).
	AfterFlush func(n int) error

	mu      sync.Mutex
	held    []write
	cut     bool
	writes  int
	syncs   int
	flushed int // syncs that reached the medium
}

type write struct {
	off  int64
	data []byte
}

// Wrap puts a fault-free volatile cache in front of inner.
func Wrap(inner target.Medium) *Medium { return &Medium{inner: inner} }

// Unwrap implements target.Unwrapper.
func (m *Medium) Unwrap() target.Medium { return m.inner }

// Path implements target.Medium.
func (m *Medium) Path() string { return m.inner.Path() }

// WriteAt implements target.Medium: the write is held until Sync.
func (m *Medium) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	if m.cut {
		m.mu.Unlock()
		return 0, ErrPowerCut
	}
	n := m.writes
	m.writes++
	m.mu.Unlock()
	if m.WriteErr != nil {
		if err := m.WriteErr(n, off, p); err != nil {
			return 0, err
		}
	}
	if m.LoseWrite != nil && m.LoseWrite(n, off, p) {
		return len(p), nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cut {
		return 0, ErrPowerCut
	}
	m.held = append(m.held, write{off, bytes.Clone(p)})
	return len(p), nil
}

// ReadAt implements target.Medium: the medium underneath with the held writes over it, as a
// page cache shows them.
func (m *Medium) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cut {
		return 0, ErrPowerCut
	}
	n, err := m.inner.ReadAt(p, off)
	for _, w := range m.held {
		lo, hi := max(off, w.off), min(off+int64(len(p)), w.off+int64(len(w.data)))
		if lo < hi {
			copy(p[lo-off:hi-off], w.data[lo-w.off:hi-w.off])
			if int(hi-off) > n {
				n, err = int(hi-off), nil
			}
		}
	}
	return n, err
}

// Sync implements target.Medium: held writes go to the medium underneath, which is synced.
func (m *Medium) Sync() error {
	m.mu.Lock()
	if m.cut {
		m.mu.Unlock()
		return ErrPowerCut
	}
	n := m.syncs
	m.syncs++
	held := m.held
	m.held = nil
	m.mu.Unlock()
	if m.SyncErr != nil {
		if err := m.SyncErr(n); err != nil {
			return err
		}
	}
	for _, w := range held {
		if _, err := m.inner.WriteAt(w.data, w.off); err != nil {
			return err
		}
	}
	if err := m.inner.Sync(); err != nil {
		return err
	}
	m.mu.Lock()
	m.flushed++
	m.mu.Unlock()
	if m.AfterFlush != nil {
		if err := m.AfterFlush(n); err != nil {
			return err
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cut {
		return ErrPowerCut
	}
	return nil
}

// ReadBack implements target.Medium: what the medium underneath holds, after a Sync (as the
// real medium syncs before it reads back).
func (m *Medium) ReadBack() (target.ReadBack, error) {
	if err := m.Sync(); err != nil {
		return nil, err
	}
	return m.inner.ReadBack()
}

// Close implements target.Medium; it closes the medium underneath even after a power cut.
func (m *Medium) Close() error { return m.inner.Close() }

// PowerCut drops every write not yet synced; every later call fails with ErrPowerCut.
func (m *Medium) PowerCut() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.cut = true
	m.held = nil
}

// Corrupt changes what the medium underneath holds at off, durably, past any cache: bit rot
// or a faulty device after the data was synced.
func (m *Medium) Corrupt(off int64, data []byte) error {
	if _, err := m.inner.WriteAt(data, off); err != nil {
		return err
	}
	return m.inner.Sync()
}

// Counts returns how many WriteAt and Sync calls were made and how many syncs reached the
// medium.
func (m *Medium) Counts() (writes, syncs, flushed int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.writes, m.syncs, m.flushed
}
