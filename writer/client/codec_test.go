package client

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

// The pooled codec writes exactly what proto.Marshal writes, at sizes on both sides of the
// pooling threshold and of every tier edge, and decodes what it wrote.
func TestBlockCodecMatchesProto(t *testing.T) {
	c := blockCodec{base: blockCallCodecBase()}
	for _, n := range []int{0, 100, 1 << 10, 32 << 10, 64 << 10, 64<<10 + 4<<10, 256 << 10, 300 << 10, 1 << 20, 1<<20 + 20<<10} {
		data := bytes.Repeat([]byte{byte(n), 7}, n/2)
		req := &otav1.WriteBlocksRequest{SessionId: "s-1", Seq: uint64(n) + 1, Sync: n%2 == 0,
			Blocks: []*otav1.Block{{Offset: uint64(n) << 16, Data: data}, {Offset: 1, Data: []byte{1, 2, 3}}}}
		want, err := proto.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		got, err := c.Marshal(req)
		if err != nil {
			t.Fatalf("%d: %v", n, err)
		}
		if !bytes.Equal(got.Materialize(), want) {
			t.Fatalf("%d: pooled encoding differs from proto.Marshal", n)
		}
		var back otav1.WriteBlocksRequest
		if err := c.Unmarshal(got, &back); err != nil {
			t.Fatalf("%d: %v", n, err)
		}
		got.Free()
		if !proto.Equal(&back, req) {
			t.Fatalf("%d: round trip differs", n)
		}
	}
	if _, err := c.Marshal("not a message"); err == nil {
		t.Fatal("a non-proto value was marshalled")
	}
}
