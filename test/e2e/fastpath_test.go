package e2e

import (
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/harness"
)

// TestFallbackHTTPToMQTT: ota-net, told its link runs at 20 Mbit/s (above AWS's 512 KiB/s
// MQTT quota), picks HTTP for a job offering both. The presigned-URL server refuses every
// URL (403, through ota-net's refreshes of the job document), so the download goes on over
// the MQTT stream and the update completes; the ready report names MQTT, the first one HTTP.
func TestFallbackHTTPToMQTT(t *testing.T) {
	t.Parallel()
	e := newEnv(t, embedded, func(o *harness.DeviceOptions) { o.NetConfigExtra = "link_bandwidth = \"20Mbit/s\"\n" })
	var gets atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gets.Add(1)
		http.Error(w, "AccessDenied", http.StatusForbidden)
	}))
	t.Cleanup(srv.Close)
	e.cloud.SetHTTPURL(srv.URL)
	img := e.image("v2.img", smallImage, 31)
	e.start()
	e.createJob("fallback", e.signer.File(img), backend.ProtocolMQTT, backend.ProtocolHTTP)
	e.waitEnd("fallback")
	us := checkSteps(t, e.cloud, "fallback", happy)
	e.checkInstalled(img, 1)
	if gets.Load() == 0 {
		t.Fatal("HTTP was not tried first")
	}
	if e.cloud.BlocksServed("fallback") == 0 {
		t.Fatal("the stream served nothing")
	}
	if got := us[0].StatusDetails["protocol"]; got != "http" {
		t.Errorf("first update names protocol %q, want http", got)
	}
	ready := 0
	for _, u := range us {
		if u.StatusDetails["self_test"] == "ready" {
			ready++
			if u.StatusDetails["protocol"] != "mqtt" {
				t.Errorf("ready update %v does not name mqtt", u.StatusDetails)
			}
		}
	}
	if ready == 0 {
		t.Error("no ready update")
	}
}
