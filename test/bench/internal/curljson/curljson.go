// Package curljson is the JSON line test/bench/httpvscurl prints last, which
// test/bench/linkbench's report reads.
package curljson

// Summary is the JSON line of one httpvscurl run.
type Summary struct {
	Bench     string `json:"bench"`
	SizeBytes int64  `json:"size_bytes"`
	Reps      int    `json:"reps"`
	Proxy     bool   `json:"proxy"`
	RateKBps  int    `json:"rate_kbps"` // toxiproxy bandwidth, KB/s (1000 bytes); 0: none
	BlockSize int    `json:"block_size"`
	// The three curl baselines: -o /dev/null, -o FILE, -o FILE and an fsync of it.
	CurlNullSeconds  []float64 `json:"curl_null_s"`
	CurlFileSeconds  []float64 `json:"curl_file_s"`
	CurlFsyncSeconds []float64 `json:"curl_fsync_s"`
	CurlNullMedian   float64   `json:"curl_null_median_s"`
	CurlFileMedian   float64   `json:"curl_file_median_s"`
	CurlFsyncMedian  float64   `json:"curl_fsync_median_s"`
	// Median curl time / median ota-net time per baseline; Ratio is RatioFsync, the one the
	// target is judged against.
	RatioNull  float64 `json:"ratio_null"`
	RatioFile  float64 `json:"ratio_file"`
	RatioFsync float64 `json:"ratio_fsync"`
	// Base: the build in -base, same repetitions.
	BaseSeconds   []float64 `json:"base_s,omitempty"`
	BaseMedian    float64   `json:"base_median_s,omitempty"`
	BaseRatio     float64   `json:"base_ratio,omitempty"` // curl file+fsync / base
	BaseNetCPU    float64   `json:"base_otanet_cpu_s,omitempty"`
	BaseWriterCPU float64   `json:"base_writer_cpu_s,omitempty"`
	OtaNetSeconds []float64 `json:"otanet_s"`
	OtaNetMedian  float64   `json:"otanet_median_s"`
	// CPU seconds (user+system) of each ota-net and ota-writer process from start to ready
	// (start-up and the writer's signature check included), medians.
	OtaNetCPU float64 `json:"otanet_cpu_s"`
	WriterCPU float64 `json:"writer_cpu_s"`
	CurlMBps  float64 `json:"curl_fsync_mbps"`
	// Load averages (1, 5, 15 min, /proc/loadavg) before the first and after the last
	// repetition: the machine may be shared, so only ratios within one run mean anything.
	LoadStart  string  `json:"load_start"`
	LoadEnd    string  `json:"load_end"`
	OtaNetMBps float64 `json:"otanet_mbps"`
	Ratio      float64 `json:"ratio"`
}

// Complete reports whether s is an unshaped run with all three curl baselines (an older
// httpvscurl's line has fewer).
func (s *Summary) Complete() bool {
	return s.Bench == "httpvscurl" && s.RateKBps == 0 && s.OtaNetMedian > 0 && s.CurlFsyncMedian > 0 && s.CurlFileMedian > 0 && s.CurlNullMedian > 0
}
