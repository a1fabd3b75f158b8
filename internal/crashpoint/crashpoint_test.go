package crashpoint

import "testing"

// In a normal build the hook is inert whatever the environment says.
func TestInertWithoutTag(t *testing.T) {
	if Enabled {
		t.Skip("built with gwota_crashpoints")
	}
	t.Setenv("GWOTA_CRASHPOINT", WriterVerify)
	t.Setenv("GWOTA_CRASHPOINT_FILE", t.TempDir()+"/m")
	Hit(WriterVerify) // would kill the test binary if it were armed
}
