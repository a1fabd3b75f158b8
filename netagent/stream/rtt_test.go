package stream

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestRTOEstimator(t *testing.T) {
	ms := func(f float64) time.Duration { return time.Duration(f * float64(time.Millisecond)) }
	type step struct {
		sample  time.Duration // > 0: a sample
		backoff bool
		alive   bool
	}
	type state struct{ SRTT, RTTVAR, RTO time.Duration }
	tests := []struct {
		name  string
		steps []step
		want  []state // after each step
	}{
		{name: "no sample: the initial RTO", steps: nil, want: nil},
		{
			name:  "first sample: RTTVAR is half of it (RFC 6298 2.2)",
			steps: []step{{sample: ms(100)}},
			want:  []state{{ms(100), ms(50), ms(300)}},
		},
		{
			name:  "steady samples shrink the variance",
			steps: []step{{sample: ms(100)}, {sample: ms(100)}, {sample: ms(100)}},
			want:  []state{{ms(100), ms(50), ms(300)}, {ms(100), ms(37.5), ms(250)}, {ms(100), ms(28.125), ms(212.5)}},
		},
		{
			name:  "a slower sample: gains 1/8 and 1/4, RTTVAR from the old SRTT",
			steps: []step{{sample: ms(100)}, {sample: ms(200)}},
			want:  []state{{ms(100), ms(50), ms(300)}, {ms(112.5), ms(62.5), ms(362.5)}},
		},
		{
			name:  "floor",
			steps: []step{{sample: ms(1)}, {sample: ms(1)}, {sample: ms(1)}},
			want:  []state{{ms(1), ms(0.5), MinRTO}, {ms(1), ms(0.375), MinRTO}, {ms(1), ms(0.28125), MinRTO}},
		},
		{
			name:  "ceiling",
			steps: []step{{sample: time.Second}},
			want:  []state{{time.Second, ms(500), 2 * time.Second}},
		},
		{
			name:  "backoff doubles up to the ceiling; a sample ends it",
			steps: []step{{sample: ms(100)}, {backoff: true}, {backoff: true}, {backoff: true}, {sample: ms(100)}},
			want: []state{{ms(100), ms(50), ms(300)}, {ms(100), ms(50), ms(600)}, {ms(100), ms(50), ms(1200)},
				{ms(100), ms(50), 2 * time.Second}, {ms(100), ms(37.5), ms(250)}},
		},
		{
			name:  "an answer without a sample ends the backoff too",
			steps: []step{{sample: ms(100)}, {backoff: true}, {alive: true}},
			want:  []state{{ms(100), ms(50), ms(300)}, {ms(100), ms(50), ms(600)}, {ms(100), ms(50), ms(300)}},
		},
		{
			name:  "backoff before any sample doubles the initial RTO",
			steps: []step{{backoff: true}},
			want:  []state{{0, 0, 2 * time.Second}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := rttEstimator{initial: 2 * time.Second, min: MinRTO, max: 2 * time.Second}
			if e.RTO() != 2*time.Second || e.Measured() {
				t.Fatalf("fresh estimator: RTO %v, measured %v", e.RTO(), e.Measured())
			}
			var got []state
			for _, s := range tc.steps {
				switch {
				case s.sample > 0:
					e.Sample(s.sample)
				case s.backoff:
					e.Backoff()
				case s.alive:
					e.Alive()
				}
				got = append(got, state{e.srtt, e.rttvar, e.RTO()})
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Fatalf("(-want +got):\n%s", diff)
			}
		})
	}
}
