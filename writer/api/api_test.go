package api_test

import (
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/api"
)

// The health service name the writer serves and clients wait for is the generated one.
func TestServiceName(t *testing.T) {
	if got, want := api.ServiceName, otav1.Writer_ServiceDesc.ServiceName; got != want {
		t.Errorf("ServiceName %q, want %q (writer.proto)", got, want)
	}
}
