package stream

import "time"

// rttEstimator keeps the smoothed round trip of stream requests and its variance the way TCP
// computes its retransmission timeout (RFC 6298): SRTT, RTTVAR with gains 1/8 and 1/4, and
// RTO = SRTT + max(G, 4*RTTVAR), clamped to [min, max]. A sample is the time from a request's
// publish to the arrival of one of its blocks that was asked for only once (Karn's rule: a
// block asked for again may be answering either request). Every block of a response is a
// sample, so the spread within a response (its later blocks come later) lands in RTTVAR and
// the deadline covers a whole response, not only its first block.
//
// Backoff doubles the RTO (a timeout without an answer, or a throttling rejection) until the
// next valid sample, as TCP does, or until Alive: unlike a TCP segment, a stream block that
// arrives at all proves the path delivers again, and keeping the doubled timeout through a
// lossy tail (where every block is a re-request, so none is a sample) would make each
// further loss cost twice the last.
type rttEstimator struct {
	srtt, rttvar time.Duration
	latest       time.Duration // the last sample
	minRTT       time.Duration // the shortest sample
	samples      int
	backoff      uint
	// initial is the RTO before any sample; min and max clamp it.
	initial, min, max time.Duration
}

// rtoGranularity is G of RFC 6298: the clock and scheduling granularity below which a
// variance term means nothing (Go timers on a loaded machine fire a millisecond or so late).
const rtoGranularity = time.Millisecond

// Sample adds one round trip measurement.
func (e *rttEstimator) Sample(r time.Duration) {
	if r <= 0 {
		r = time.Microsecond
	}
	if e.samples == 0 {
		e.srtt, e.rttvar = r, r/2
	} else {
		d := e.srtt - r
		if d < 0 {
			d = -d
		}
		e.rttvar = (3*e.rttvar + d) / 4
		e.srtt = (7*e.srtt + r) / 8
	}
	e.latest = r
	if e.samples == 0 || r < e.minRTT {
		e.minRTT = r
	}
	e.samples++
	e.backoff = 0
}

// RTO is the current retransmission timeout, backoff included.
func (e *rttEstimator) RTO() time.Duration {
	rto := e.initial
	if e.samples > 0 {
		rto = e.srtt + max(rtoGranularity, 4*e.rttvar)
	}
	rto = max(rto, e.min)
	for n := uint(0); n < e.backoff && rto < e.max; n++ {
		rto *= 2
	}
	return min(rto, e.max)
}

// Backoff doubles the RTO until the next sample.
func (e *rttEstimator) Backoff() {
	if e.RTO() < e.max {
		e.backoff++
	}
}

// Alive ends a backoff without a sample: an answer came, even if an ambiguous one.
func (e *rttEstimator) Alive() { e.backoff = 0 }

// Measured reports whether there is at least one sample.
func (e *rttEstimator) Measured() bool { return e.samples > 0 }
