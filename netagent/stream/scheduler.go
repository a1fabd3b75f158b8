package stream

import (
	"context"
	"time"
)

// MinRTO is the floor of the retransmission timeout. TCP's 1 s floor (RFC 6298) protects a
// congestion window; here a spurious re-request costs one request of at most 128 KB of
// duplicate data, and a block is given up on only with evidence (blocks sent after it
// arrived) or after a timeout that doubles per try. 10 ms stays above the jitter of Go timers
// and broker batching on a loaded machine, so a loopback link does not re-request on noise.
// The ceiling is MaxQuietPeriod (30 s by default): a round trip measured with a window
// queued on a slow link can exceed the quiet period (satellite: 0.6 s plus 1.7 s of queued
// window), and a lower ceiling would give up on blocks still on their way.
const MinRTO = 10 * time.Millisecond

// arrived records that block i of request k came (at now): a round trip sample unless the
// block was asked for more than once (Karn's rule), and evidence of loss for blocks the
// server sent before it: those of k below i (a response's blocks go out in order), and, once
// k is answered in full, all of the requests sent before k. Nothing else is evidence: under
// AWS's 512 KiB/s quota the blocks of a window wait in the broker behind one another, so a
// response comes spread over its transfer time and the later requests' round trips include
// the earlier ones' data; and responses to requests sent close together may go out in
// either order (AWS promises none, and the emulator's delayed responses swap at times), so
// the first block of a later response proves nothing, while a later response answered in
// full leaves an earlier one queued at most a block's transfer time behind (the reordering
// window covers that, and a block of a later request must have come after that answer: a
// process stalled by its writer sees nothing meanwhile), and once a block of the earlier one
// comes, its response is under way and only its own order counts. Any new block also ends an RTO
// backoff: the path delivers, so silence was loss, not throttling.
func (r *run) arrived(k, i int, now time.Time) {
	r.rtt.Alive()
	q := r.inflight[k]
	if r.again.Has(i) {
		return // ambiguous: it may answer an earlier request; it proves nothing about order
	}
	r.rtt.Sample(now.Sub(q.sentAt))
	if q.later {
		// Its response is under way after a later one was answered: it was queued behind
		// that one, not lost. From here its own order is the evidence.
		q.later, q.overtaken, q.evidenceAt = false, false, time.Time{}
	}
	q.highest = max(q.highest, i)
	if q.evidenceAt.IsZero() && r.evident(q) {
		q.evidenceAt = now
	}
	for _, p := range r.inflight[:k] {
		// A block of a later request came after that later answer, where p's response
		// would have been next: p is not queued there.
		p.overtaken = p.overtaken || p.later
	}
	if q.remaining > 1 {
		return
	}
	for _, p := range r.inflight[:k] {
		p.later = true
		if p.evidenceAt.IsZero() {
			p.evidenceAt = now
		}
	}
}

// gapArrived keeps the smoothed gap between two new blocks (gains of SRTT's): under a
// throttle it is a block's transfer time, the least a reordering window must cover.
func (r *run) gapArrived(now time.Time) {
	if !r.lastBlock.IsZero() {
		g := now.Sub(r.lastBlock)
		if r.gap == 0 {
			r.gap = g
		} else {
			r.gap = (7*r.gap + g) / 8
		}
	}
	r.lastBlock = now
}

// lostBy reports whether the evidence says block i of q is lost (once the reordering window
// has passed): it is still pending and a block sent after it arrived.
func (r *run) lostBy(q *request, i int) bool {
	return r.pending.Has(i) && (q.later && q.overtaken || i < q.highest)
}

// evident reports whether some block of q has evidence of loss.
func (r *run) evident(q *request) bool {
	for _, i := range q.blocks {
		if r.lostBy(q, i) {
			return true
		}
	}
	return false
}

// reorderWindow is how long after the evidence a block still counts as on its way: a quarter
// SRTT (at least MinRTO, at most the RTO), as TCP's RACK does (RFC 8985), and at least two
// smoothed gaps between blocks: a response queued behind a later one starts a block's
// transfer time after it. It widens after a spurious re-request.
func (r *run) reorderWindow(rto time.Duration) time.Duration {
	if !r.rtt.Measured() {
		return rto
	}
	return max(min(rto, r.rtt.srtt/4*time.Duration(r.reorder)), MinRTO, 2*r.gap)
}

// spurious widens the reordering window after a block that was asked for again arrived
// twice (RACK does so on a DSACK): responses that interleave, or a stalled reader, look like
// loss to a narrow window. At most a whole SRTT times 8; the RTO bounds it anyway.
func (r *run) spurious() {
	r.reorder = min(r.reorder*2, 32)
}

// lostBlocks returns the blocks of q the evidence says are lost; silent: nothing at all
// arrived for a while in the tail, so everything of q older than that wait counts.
func (r *run) lostBlocks(q *request, now time.Time, rto time.Duration, silent bool) []int {
	if silent {
		if now.Sub(q.sentAt) < r.tailWait(rto) {
			return nil
		}
	} else if q.evidenceAt.IsZero() || now.Sub(q.evidenceAt) < r.reorderWindow(rto) {
		return nil
	}
	var lost []int
	for _, i := range q.blocks {
		if silent && r.pending.Has(i) || r.lostBy(q, i) {
			lost = append(lost, i)
		}
	}
	return lost
}

// silent reports whether the RTO timeout applies: in the tail, a measured RTO below the quiet
// period and no block for that long. Past that the quiet rounds take over. While requests
// for blocks not asked for yet still go out, their answers are the evidence that finds a
// loss; silence then is a stall more likely than a loss, and only the tail (everything
// wanted is asked for, so no later answer can come) needs a timeout.
func (r *run) silent(now time.Time, rto time.Duration) bool {
	return r.tailTimer(rto) && now.Sub(r.lastActivity) >= r.tailWait(rto)
}

// tailTimer reports whether the RTO timeout is armed: in the tail, with a round trip and a
// gap between two blocks measured (one sample alone may be a burst the quota let through at
// once, shorter than the next block's transfer time), and an RTO below the quiet period.
func (r *run) tailTimer(rto time.Duration) bool {
	return r.rtt.Measured() && r.gap > 0 && rto < r.d.cfg.QuietPeriod && r.tail()
}

// probeWait is the silence after which the tail is asked for again: the RTO (SRTT plus four
// RTTVAR, RFC 6298), and at least two smoothed gaps between blocks. Not a multiple of the shortest round trip (TCP's tail loss probe): under
// AWS's quota a block of a queued window takes a round trip of its own to arrive and the gap
// between two blocks is a block's transfer time (125 ms for 64 KiB at 512 KiB/s), so a wait
// from the shortest round trip fires while the tail is still arriving. SRTT follows the
// queueing delay the samples carry. Without evidence the only sign of loss is time, and a
// stalled process looks the same; the tail's re-requests go out twice (repeat), so this
// wait is rarely paid twice.
func (r *run) probeWait(rto time.Duration) time.Duration {
	return max(rto, 2*r.gap)
}

// tailWait is the silence, since the last block or since the oldest request went out, after
// which the tail is given up on: probeWait, and at least the drain time of what is still
// asked for: its bytes at the connection's quota (Config.QuotaBytesPerSecond). Under AWS's
// quota a response's first blocks come at once in the quota's burst, so the round trip and
// the gap between blocks measure the burst, not the queue behind it (a delta update's sparse
// small blocks: RTO at its 10 ms floor while the rest waits tens of milliseconds for the
// throttle); the quota is a known constant, and no block can arrive before the bytes ahead
// of it drained, so silence shorter than that says nothing. It bounds only the timeout:
// evidence (a block sent later arrived) finds a loss as before.
func (r *run) tailWait(rto time.Duration) time.Duration {
	return max(r.probeWait(rto), r.drain())
}

// drain is the time the connection's quota needs to deliver the blocks still asked for,
// each with its MQTT publish around it (the topic and a few dozen bytes of header and CBOR).
func (r *run) drain() time.Duration {
	rate := r.d.cfg.QuotaBytesPerSecond
	if rate <= 0 || r.asking == 0 {
		return 0
	}
	bytes := int64(r.asking) * int64(r.f.BlockSize+r.msgOverhead)
	return time.Duration(bytes * int64(time.Second) / int64(rate))
}

// tail reports whether every block still wanted is asked for already.
func (r *run) tail() bool {
	if len(r.inflight) < r.d.cfg.RequestsInFlight {
		return true // fill stops short of the window only when nothing is left to ask
	}
	// Counted, not scanned: tail runs after every block, and a scan of both bitmaps there
	// made a download quadratic in the image's block count.
	return r.held+r.asking == r.total
}

// setPending and clearPending keep asking equal to the blocks set in pending.
func (r *run) setPending(i int) {
	if !r.pending.Has(i) {
		r.pending.Set(i)
		r.asking++
	}
}

func (r *run) clearPending(i int) {
	if r.pending.Has(i) {
		r.pending.Clear(i)
		r.asking--
	}
}

// detectLoss gives up on the blocks the evidence says are lost (they become wanted again,
// the caller fills) and reports whether it did.
func (r *run) detectLoss(now time.Time) bool {
	rto := r.rtt.RTO()
	silent := r.silent(now, rto)
	found := false
	for k := 0; k < len(r.inflight); {
		q := r.inflight[k]
		// A timeout gives up on the oldest request only (TCP retransmits the first segment):
		// silence may be a stall, and re-requesting the whole window would send it twice.
		lost := r.lostBlocks(q, now, rto, silent && !found)
		if len(lost) == 0 {
			k++
			continue
		}
		found = true
		r.d.log.Trace("blocks lost", "blocks", lost, "age", now.Sub(q.sentAt), "rto", rto, "srtt", r.rtt.srtt, "later", q.later, "highest", q.highest, "silent", silent)
		if len(lost) == q.remaining {
			r.expire(k)
			continue
		}
		// Part of the request is lost; the rest (above what arrived) may still come.
		keep := q.blocks[:0:0]
		for _, i := range q.blocks {
			if r.pending.Has(i) && containsSorted(lost, i) {
				r.clearPending(i)
				r.cursor = min(r.cursor, i)
				continue
			}
			keep = append(keep, i)
		}
		q.blocks = keep
		q.remaining -= len(lost)
		q.evidenceAt = time.Time{} // what is left lies above every block that arrived
		r.stats.Rerequests++
		k++
	}
	if found && silent {
		r.stats.Timeouts++
		r.rtt.Backoff()
		r.lastActivity = now
	}
	return found
}

func containsSorted(s []int, x int) bool {
	for _, v := range s {
		if v == x {
			return true
		}
		if v > x {
			return false
		}
	}
	return false
}

// nextCheck is when tick must run next: the earliest deadline of a request with evidence of
// loss, the RTO timeout, or the end of the quiet period.
func (r *run) nextCheck() time.Time {
	if !r.hold.IsZero() {
		return r.hold
	}
	next := r.lastProgress.Add(r.quiet())
	if len(r.inflight) == 0 {
		return next
	}
	rto := r.rtt.RTO()
	if r.tailTimer(rto) {
		// The timeout needs both the silence and a request past its deadline.
		oldest := r.inflight[0].sentAt
		for _, q := range r.inflight[1:] {
			oldest = minTime(oldest, q.sentAt)
		}
		next = minTime(next, maxTime(r.lastActivity, oldest).Add(r.tailWait(rto)))
	}
	for _, q := range r.inflight {
		if r.suspect(q) {
			next = minTime(next, q.evidenceAt.Add(r.reorderWindow(rto)))
		}
	}
	return next
}

// suspect reports whether q has blocks that are lost once its reordering window passes.
func (r *run) suspect(q *request) bool { return !q.evidenceAt.IsZero() && r.evident(q) }

// repeat reports whether a request for blocks goes out twice: a re-request in the tail.
// There no later answer can reveal its loss, so losing it again would cost a timeout; a
// second copy makes that the square of the loss rate, for the price of a duplicate of
// blocks that were lost once already (a loss-free download never repeats). Not in the quiet
// rounds: when nothing arrives at all, a second copy buys nothing.
func (r *run) repeat(blocks []int) bool {
	for _, i := range blocks {
		if !r.again.Has(i) {
			return false
		}
	}
	return r.rtt.Measured() && r.rtt.RTO() < r.d.cfg.QuietPeriod && r.tail()
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// timeout runs when the timer fires (due is when it was meant to). Events already queued are
// handled first: they may be the very blocks the timer would give up on. A timer that fires
// well after due means this process was not running (a loaded machine): blocks that came
// meanwhile may still sit unread in the socket, so the decision waits half an RTO more,
// once, letting the MQTT client's reader catch up; a spurious re-request costs a duplicate
// response on the link.
func (r *run) timeout(ctx context.Context, now, due time.Time) error {
	if len(r.events) > 0 {
		return nil // the loop handles them and re-arms
	}
	rto := r.rtt.RTO()
	if r.hold.IsZero() && now.Sub(due) > max(rto/4, 2*time.Millisecond) {
		r.hold = now.Add(rto / 2)
		return nil
	}
	if now.Before(r.hold) {
		return nil
	}
	r.hold = time.Time{}
	return r.tick(ctx, now)
}
