package client

import (
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	"github.com/gwota/gwota/writer/api"
)

// blockPool holds marshal buffers for block messages, sized for them (see api.BufferTiers).
var blockPool = api.NewBufferPool()

// blockCodec is grpc's proto codec with marshal buffers from blockPool. It keeps the name
// "proto": the wire format and content-subtype are the same, the server sees no difference.
type blockCodec struct{ base encoding.CodecV2 }

// blockCallOption makes a call marshal with blockCodec.
func blockCallOption() grpc.CallOption {
	return grpc.ForceCodecV2(blockCodec{base: blockCallCodecBase()})
}

// blockCallCodecBase is grpc's registered proto codec.
func blockCallCodecBase() encoding.CodecV2 { return encoding.GetCodecV2(protoenc.Name) }

func (c blockCodec) Name() string { return protoenc.Name }

func (c blockCodec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("proto: failed to marshal, message is %T, want proto.Message", v)
	}
	size := proto.Size(m)
	if mem.IsBelowBufferPoolingThreshold(size) {
		return c.base.Marshal(v)
	}
	buf := blockPool.Get(size)
	// UseCachedSize: the size was just computed and the message is not being changed.
	out, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend((*buf)[:0], m)
	if err != nil {
		blockPool.Put(buf)
		return nil, err
	}
	*buf = out
	return mem.BufferSlice{mem.NewBuffer(buf, blockPool)}, nil
}

func (c blockCodec) Unmarshal(data mem.BufferSlice, v any) error { return c.base.Unmarshal(data, v) }
