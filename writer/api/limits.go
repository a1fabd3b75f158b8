package api

// ServiceName is the writer's gRPC service (package and service of writer.proto), also the
// name its health service reports SERVING for.
const ServiceName = "ota.v1.Writer"

// Message size budget. A WriteBlocksRequest carries at most the session's MaxBlockSize bytes
// of block data (one full block, or several smaller ones) and at most MaxBlocksPerMessage
// blocks; the rest of the budget is protobuf framing: per block the offset and length
// prefixes, per message the session id, seq and sync flag.
const (
	MaxBlocksPerMessage = 256
	perBlockOverhead    = 24
	perMessageOverhead  = 1024
)

// MaxMessageSize is the largest WriteBlocks message the writer receives for its largest
// block; the handshake tells it to the client.
func MaxMessageSize(maxBlock uint32) int {
	return int(maxBlock) + perMessageOverhead + perBlockOverhead*MaxBlocksPerMessage
}

// DefaultMaxMessageSize is what a client sends at most until the handshake tells the
// writer's limit: a 1 MiB block with its framing.
const DefaultMaxMessageSize = 1<<20 + 16<<10

// MaxResponseSize bounds the writer's responses, and clients accept this much: missing-block
// bitmaps reach 8 MiB per session with small blocks, bounded by the writer's own state, not
// by the block size.
const MaxResponseSize = 64 << 20

// BufferTiers are the sizes of the pooled message buffers on both sides of the socket. grpc's
// default pool has no tier between 32 KiB and 1 MiB, so every 64..256 KiB WriteBlocks message
// took a 1 MiB buffer, and under a soft memory limit (GCs empty sync.Pools) that was mostly
// fresh garbage, as much as the image several times over. Powers of two plus room for a
// message's framing (offsets, tags, session id).
func BufferTiers() []int {
	return []int{256, 4 << 10, 16 << 10, 32 << 10,
		64<<10 + 4<<10, 128<<10 + 4<<10, 256<<10 + 4<<10, 512<<10 + 4<<10, 1<<20 + 16<<10}
}
