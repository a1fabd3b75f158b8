package server

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"unicode/utf8"

	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

// blockCodec is grpc's proto codec, except that a WriteBlocksRequest is decoded here with
// every block's data a slice of the received message instead of a copy. grpc's codec copies
// each message into a buffer from grpc's default pool (cleared on every Get: a 1 MiB memclr
// per 256 KiB message), then proto.Unmarshal copies every block again into a fresh
// allocation; together they were about half of the writer's CPU on an HTTP download (and
// the garbage kept the scavenger busy). Now the message is copied at most once, into
// recvPool, and that buffer is held until the handler calls release after the engine wrote
// the blocks (the engine keeps no block data past Write).
//
// The decoder takes the same bytes proto.Unmarshal takes and refuses what it refuses
// (writer/server/codec_test.go:FuzzDecodeWriteBlocks): fields it does not know are
// skipped, as proto.Unmarshal with DiscardUnknown does.
type blockCodec struct {
	base encoding.CodecV2
	pool mem.BufferPool
	held sync.Map // *otav1.WriteBlocksRequest -> mem.Buffer its blocks alias
}

func newBlockCodec(pool mem.BufferPool) *blockCodec {
	return &blockCodec{base: encoding.GetCodecV2(protoenc.Name), pool: pool}
}

// Name keeps "proto": the wire format is the same, clients see no difference.
func (c *blockCodec) Name() string { return protoenc.Name }

func (c *blockCodec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }

func (c *blockCodec) Unmarshal(data mem.BufferSlice, v any) error {
	req, ok := v.(*otav1.WriteBlocksRequest)
	if !ok {
		return c.base.Unmarshal(data, v)
	}
	buf := data.MaterializeToBuffer(c.pool)
	if err := decodeWriteBlocks(buf.ReadOnlyData(), req); err != nil {
		buf.Free()
		return fmt.Errorf("failed to unmarshal, message is %T: %w", v, err)
	}
	c.held.Store(req, buf)
	return nil
}

// release returns the buffer req's blocks alias (a no-op for a request it did not decode).
// req's blocks must not be used after.
func (c *blockCodec) release(req *otav1.WriteBlocksRequest) {
	if req == nil {
		return
	}
	if b, ok := c.held.LoadAndDelete(req); ok {
		b.(mem.Buffer).Free()
	}
}

var errUTF8 = errors.New("session_id: invalid UTF-8")

// decodeWriteBlocks decodes b into m (reset first); block data aliases b.
func decodeWriteBlocks(b []byte, m *otav1.WriteBlocksRequest) error {
	m.Reset()
	for len(b) > 0 {
		num, typ, n, err := consumeTag(b)
		if err != nil {
			return err
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return protowire.ParseError(n)
			}
			if !utf8.Valid(v) {
				return errUTF8
			}
			m.SessionId, b = string(v), b[n:]
		case num == 2 && typ == protowire.VarintType:
			v, rest, err := consumeVarint(b)
			if err != nil {
				return err
			}
			m.Seq, b = v, rest
		case num == 3 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return protowire.ParseError(n)
			}
			blk, err := decodeBlock(v)
			if err != nil {
				return err
			}
			m.Blocks, b = append(m.Blocks, blk), b[n:]
		case num == 4 && typ == protowire.VarintType:
			v, rest, err := consumeVarint(b)
			if err != nil {
				return err
			}
			m.Sync, b = protowire.DecodeBool(v), rest
		case num == 5 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return protowire.ParseError(n)
			}
			m.BufferToken, b = bytes.Clone(v), b[n:]
		default:
			// Unknown field, or a known one with another wire type (proto.Unmarshal keeps
			// either as unknown).
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return protowire.ParseError(n)
			}
			b = b[n:]
		}
	}
	return nil
}

func decodeBlock(b []byte) (*otav1.Block, error) {
	blk := &otav1.Block{}
	for len(b) > 0 {
		num, typ, n, err := consumeTag(b)
		if err != nil {
			return nil, err
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			v, rest, err := consumeVarint(b)
			if err != nil {
				return nil, err
			}
			blk.Offset, b = v, rest
		case num == 2 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return nil, protowire.ParseError(n)
			}
			// Capacity cut at the length: an append to it can never reach the next field.
			blk.Data, b = v[:len(v):len(v)], b[n:]
		case num == 3 && typ == protowire.VarintType:
			v, rest, err := consumeVarint(b)
			if err != nil {
				return nil, err
			}
			blk.BufferOffset, b = v, rest
		case num == 4 && typ == protowire.VarintType:
			v, rest, err := consumeVarint(b)
			if err != nil {
				return nil, err
			}
			// As proto.Unmarshal decodes a uint32: the varint's low 32 bits.
			blk.BufferLength, b = uint32(v), rest
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return nil, protowire.ParseError(n)
			}
			b = b[n:]
		}
	}
	return blk, nil
}

// consumeVarint is protowire.ConsumeVarint with its error, and the rest of b.
func consumeVarint(b []byte) (uint64, []byte, error) {
	v, n := protowire.ConsumeVarint(b)
	if n < 0 {
		return 0, nil, protowire.ParseError(n)
	}
	return v, b[n:], nil
}

// consumeTag is protowire.ConsumeTag refusing field numbers above MaxValidNumber too, as
// proto.Unmarshal does (ConsumeTag lets them through up to MaxInt32).
func consumeTag(b []byte) (protowire.Number, protowire.Type, int, error) {
	num, typ, n := protowire.ConsumeTag(b)
	if n < 0 {
		return 0, 0, 0, protowire.ParseError(n)
	}
	if !num.IsValid() {
		return 0, 0, 0, fmt.Errorf("invalid field number %d", num)
	}
	return num, typ, n, nil
}
