package stream

var EncodeBlockForTest = encodeBlockForTest

func encodeBlockForTest(b Block) ([]byte, error) { return encMode.Marshal(b) }
