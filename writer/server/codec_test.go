package server

import (
	"bytes"
	"testing"
	"unsafe"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/api"
)

// decodeSeeds are WriteBlocksRequest encodings, valid and not, that the hand decoder must
// treat as proto.Unmarshal does.
func decodeSeeds(t testing.TB) map[string][]byte {
	t.Helper()
	mustMarshal := func(m proto.Message) []byte {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	full := mustMarshal(&otav1.WriteBlocksRequest{SessionId: "s-1", Seq: 7, Sync: true, Blocks: []*otav1.Block{
		{Offset: 0, Data: bytes.Repeat([]byte{1}, 100)}, {Offset: 4096, Data: []byte("x")}, {Offset: 8192}}})
	shared := mustMarshal(&otav1.WriteBlocksRequest{SessionId: "s-1", Seq: 8, BufferToken: []byte("0123456789abcdef"), Blocks: []*otav1.Block{
		{Offset: 0, BufferOffset: 1 << 20, BufferLength: 65536}, {Offset: 65536, BufferOffset: 0, BufferLength: 1}}})
	var lengthOver32 []byte // buffer_length as a varint above 2^32: proto.Unmarshal keeps the low 32 bits
	{
		var blk []byte
		blk = protowire.AppendTag(blk, 4, protowire.VarintType)
		blk = protowire.AppendVarint(blk, 1<<32+5)
		blk = protowire.AppendTag(blk, 3, protowire.VarintType)
		blk = protowire.AppendVarint(blk, 1<<63)
		lengthOver32 = protowire.AppendTag(lengthOver32, 3, protowire.BytesType)
		lengthOver32 = protowire.AppendBytes(lengthOver32, blk)
		lengthOver32 = protowire.AppendTag(lengthOver32, 5, protowire.BytesType)
		lengthOver32 = protowire.AppendBytes(lengthOver32, nil)
	}
	var unknown []byte
	unknown = protowire.AppendTag(unknown, 9, protowire.BytesType)
	unknown = protowire.AppendBytes(unknown, []byte("later field"))
	unknown = protowire.AppendTag(unknown, 10, protowire.Fixed32Type)
	unknown = protowire.AppendFixed32(unknown, 5)
	var wrongType []byte // seq as bytes, blocks as a varint: unknown fields to proto.Unmarshal
	wrongType = protowire.AppendTag(wrongType, 2, protowire.BytesType)
	wrongType = protowire.AppendBytes(wrongType, []byte("7"))
	wrongType = protowire.AppendTag(wrongType, 3, protowire.VarintType)
	wrongType = protowire.AppendVarint(wrongType, 1)
	var badUTF8 []byte
	badUTF8 = protowire.AppendTag(badUTF8, 1, protowire.BytesType)
	badUTF8 = protowire.AppendBytes(badUTF8, []byte{0xff, 0xfe})
	var blockUnknown []byte // a block with a field of its own proto.Unmarshal does not know
	{
		var blk []byte
		blk = protowire.AppendTag(blk, 2, protowire.BytesType)
		blk = protowire.AppendBytes(blk, []byte("data"))
		blk = protowire.AppendTag(blk, 5, protowire.VarintType)
		blk = protowire.AppendVarint(blk, 300)
		blk = protowire.AppendTag(blk, 1, protowire.VarintType)
		blk = protowire.AppendVarint(blk, 4096)
		blk = protowire.AppendTag(blk, 1, protowire.VarintType) // repeated: the last one wins
		blk = protowire.AppendVarint(blk, 8192)
		blockUnknown = protowire.AppendTag(blockUnknown, 3, protowire.BytesType)
		blockUnknown = protowire.AppendBytes(blockUnknown, blk)
	}
	var group []byte
	group = protowire.AppendTag(group, 11, protowire.StartGroupType)
	group = protowire.AppendTag(group, 1, protowire.VarintType)
	group = protowire.AppendVarint(group, 1)
	group = protowire.AppendTag(group, 11, protowire.EndGroupType)
	return map[string][]byte{
		"empty":             nil,
		"full":              full,
		"shared buffer":     shared,
		"length over 32":    lengthOver32,
		"truncated":         full[:len(full)-3],
		"unknown fields":    append(append([]byte{}, full...), unknown...),
		"wrong wire types":  wrongType,
		"bad utf8 session":  badUTF8,
		"block unknown":     blockUnknown,
		"group":             group,
		"stray end group":   protowire.AppendTag(nil, 11, protowire.EndGroupType),
		"field number 0":    {0x00, 0x01},
		"varint overflow":   {0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01},
		"length past end":   {0x1a, 0x7f, 0x08},
		"block truncated":   {0x1a, 0x02, 0x12, 0x05},
		"sync as big value": {0x20, 0x80, 0x01},
	}
}

// checkDecode fails unless decodeWriteBlocks and proto.Unmarshal (unknown fields discarded)
// agree on b: both refuse it, or both decode the same message.
func checkDecode(t *testing.T, b []byte) {
	want := &otav1.WriteBlocksRequest{}
	werr := proto.UnmarshalOptions{DiscardUnknown: true}.Unmarshal(b, want)
	got := &otav1.WriteBlocksRequest{SessionId: "stale", Blocks: []*otav1.Block{{}}} // reset first
	gerr := decodeWriteBlocks(b, got)
	if (werr == nil) != (gerr == nil) {
		t.Fatalf("decodeWriteBlocks(%x): error %v, proto.Unmarshal: %v", b, gerr, werr)
	}
	if werr == nil && !proto.Equal(got, want) {
		t.Fatalf("decodeWriteBlocks(%x) = %v, proto.Unmarshal = %v", b, got, want)
	}
}

func TestDecodeWriteBlocks(t *testing.T) {
	for name, b := range decodeSeeds(t) {
		t.Run(name, func(t *testing.T) { checkDecode(t, b) })
	}
}

// go test -run '^$' -fuzz FuzzDecodeWriteBlocks ./writer/server/
func FuzzDecodeWriteBlocks(f *testing.F) {
	for _, b := range decodeSeeds(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) { checkDecode(t, b) })
}

// The blocks of a decoded request alias the buffer the codec holds (no copy), whether grpc
// delivered the message in one buffer or in frames; release hands the buffer back once.
func TestBlockCodecAliasesAndReleases(t *testing.T) {
	data := bytes.Repeat([]byte{0xab}, 40<<10)
	msg, err := proto.Marshal(&otav1.WriteBlocksRequest{SessionId: "s", Seq: 1, Blocks: []*otav1.Block{{Offset: 0, Data: data}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, frames := range []int{1, 3} {
		var in mem.BufferSlice
		step := (len(msg) + frames - 1) / frames
		for off := 0; off < len(msg); off += step {
			in = append(in, mem.SliceBuffer(msg[off:min(off+step, len(msg))]))
		}
		c := newBlockCodec(api.NewBufferPool())
		req := &otav1.WriteBlocksRequest{}
		if err := c.Unmarshal(in, req); err != nil {
			t.Fatal(err)
		}
		held, ok := c.held.Load(req)
		if !ok {
			t.Fatalf("%d frames: the codec holds no buffer for the request", frames)
		}
		buf := held.(mem.Buffer).ReadOnlyData()
		got := req.GetBlocks()[0].GetData()
		if !bytes.Equal(got, data) {
			t.Fatalf("%d frames: block data differs", frames)
		}
		if !within(got, buf) {
			t.Errorf("%d frames: block data is a copy, not a slice of the received buffer", frames)
		}
		c.release(req)
		c.release(req) // a second release is a no-op
		if _, ok := c.held.Load(req); ok {
			t.Errorf("%d frames: buffer still held after release", frames)
		}
	}
	// Other messages go through grpc's own codec and hold nothing.
	c := newBlockCodec(api.NewBufferPool())
	b, _ := proto.Marshal(&otav1.FinishSessionRequest{SessionId: "s"})
	var fin otav1.FinishSessionRequest
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(b)}, &fin); err != nil || fin.GetSessionId() != "s" {
		t.Fatalf("FinishSessionRequest: %v, %v", &fin, err)
	}
	n := 0
	c.held.Range(func(any, any) bool { n++; return true })
	if n != 0 {
		t.Errorf("%d buffers held after a FinishSessionRequest", n)
	}
}

// within says whether p lies inside buf's memory.
func within(p, buf []byte) bool {
	a, lo := uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(unsafe.Pointer(unsafe.SliceData(buf)))
	return a >= lo && a+uintptr(len(p)) <= lo+uintptr(len(buf))
}
