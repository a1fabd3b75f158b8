package docs

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// repoRoot is the module root: go test runs in this package's directory.
const repoRoot = ".."

// reasonRow is what the test checks of a row of the reason table.
type reasonRow struct {
	Name  string
	Code  int
	GRPC  string
	Class string
}

// TestReasonTableMatchesCode parses the reason table of REASONS.md and compares it with the
// Reason enum and status.Table: one row per enum value but the unspecified one, with its
// statusDetails string, number, gRPC code and class.
func TestReasonTableMatchesCode(t *testing.T) {
	doc, err := os.ReadFile("REASONS.md")
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseReasonTable(doc)
	if err != nil {
		t.Fatal(err)
	}
	var want []reasonRow
	for _, v := range slices.Sorted(func(yield func(int32) bool) {
		for _, n := range otav1.Reason_value {
			if !yield(n) {
				return
			}
		}
	}) {
		r := otav1.Reason(v)
		if r == otav1.Reason_REASON_UNSPECIFIED {
			continue
		}
		want = append(want, reasonRow{Name: status.Name(r), Code: int(v), GRPC: status.GRPCCode(r).String(), Class: status.ClassOf(r).String()})
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("docs/REASONS.md reason table differs from the Reason enum and status.Table (-code +doc):\n%s", diff)
	}
}

// parseReasonTable reads the table whose header has the columns reason, code, gRPC code and
// class, in document order. Cells may be in backquotes.
func parseReasonTable(doc []byte) ([]reasonRow, error) {
	var rows []reasonRow
	var cols map[string]int
	for line := range strings.Lines(string(doc)) {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "|") {
			if cols != nil && len(rows) > 0 {
				break // the table ended
			}
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.Trim(strings.TrimSpace(cells[i]), "`")
		}
		if cols == nil {
			m := map[string]int{}
			for i, c := range cells {
				m[c] = i
			}
			_, a := m["reason"]
			_, b := m["code"]
			_, c := m["gRPC code"]
			_, d := m["class"]
			if a && b && c && d {
				cols = m
			}
			continue
		}
		if strings.Trim(cells[0], "-: ") == "" {
			continue // the separator line
		}
		if len(cells) <= max(cols["reason"], cols["code"], cols["gRPC code"], cols["class"]) {
			return nil, errors.New("short row: " + line)
		}
		code, err := strconv.Atoi(cells[cols["code"]])
		if err != nil {
			return nil, errors.New("bad code in row: " + line)
		}
		rows = append(rows, reasonRow{Name: cells[cols["reason"]], Code: code, GRPC: cells[cols["gRPC code"]], Class: cells[cols["class"]]})
	}
	if cols == nil {
		return nil, errors.New("no table with the columns reason, code, gRPC code and class")
	}
	return rows, nil
}

func TestParseReasonTable(t *testing.T) {
	doc := "intro\n\n| reason | code | meaning | gRPC code | class |\n|---|---|---|---|---|\n| `a` | 1 | x | Internal | fatal |\n| b | 2 | y | NotFound | `gone` |\n\n| other | table |\n"
	got, err := parseReasonTable([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	want := []reasonRow{{"a", 1, "Internal", "fatal"}, {"b", 2, "NotFound", "gone"}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Error(diff)
	}
	if _, err := parseReasonTable([]byte("| reason | code | gRPC code |\n|---|---|---|\n")); err == nil {
		t.Error("a table without a class column was accepted")
	}
}

// TestCitedFilesExist: every Markdown path that a tracked file names exists in the
// repository, relative to the repository root or to the citing file. Paths starting with "/"
// (installed locations) and URLs are not citations of the repository.
func TestCitedFilesExist(t *testing.T) {
	files := trackedFiles(t)
	for _, p := range citationErrors(repoRoot, files, nil) {
		t.Error(p)
	}
}

// TestDocumentedTestsExist: every "file_test.go:TestName" a Markdown file names is a test of
// that name in that file, and every relative link of a Markdown file resolves (with its
// #anchor, when the target is Markdown).
func TestDocumentedTestsExist(t *testing.T) {
	for _, p := range linkErrors(repoRoot, trackedFiles(t)) {
		t.Error(p)
	}
}

// TestCheckersFail proves each checker reports what it must, on a small tree.
func TestCheckersFail(t *testing.T) {
	root := t.TempDir()
	// Fixture names are spelled with "@md" so that this file cites none of them.
	md := strings.NewReplacer("@md", ".md").Replace
	write := func(name, body string) {
		t.Helper()
		p := filepath.Join(root, md(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(md(body)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("docs/A@md", "# Title here\n\nSee [b](B@md#part-two), [c](../pkg/x.go), `pkg/x_test.go:TestReal`, "+
		"`pkg/x_test.go:TestMissing`, `pkg/none_test.go:TestReal`, [bad](B@md#nope) and [out](https://example.com/Z@md).\n")
	write("docs/B@md", "# B\n\n## Part two\n")
	write("pkg/x.go", "package pkg\n\n// Facts: docs/A@md section 2, B@md, GONE@md, /usr/share/doc/x/README@md.\n")
	write("pkg/x_test.go", "package pkg\n\nfunc TestReal(t *testing.T) {}\n")
	files := []string{md("docs/A@md"), md("docs/B@md"), "pkg/x.go", "pkg/x_test.go"}

	wantCite := []string{
		md(`pkg/x.go:3: cites B@md, which is not in the repository`),
		md(`pkg/x.go:3: cites GONE@md, which is not in the repository`),
	}
	if diff := cmp.Diff(wantCite, citationErrors(root, files, nil)); diff != "" {
		t.Errorf("citations (-want +got):\n%s", diff)
	}
	wantLinks := []string{
		md(`docs/A@md:3: names pkg/x_test.go:TestMissing, but pkg/x_test.go has no func TestMissing`),
		md(`docs/A@md:3: names pkg/none_test.go:TestReal, but pkg/none_test.go is not in the repository`),
		md(`docs/A@md:3: links B@md#nope: docs/B@md has no heading with anchor "nope"`),
	}
	if diff := cmp.Diff(wantLinks, linkErrors(root, files)); diff != "" {
		t.Errorf("links (-want +got):\n%s", diff)
	}
}

var (
	urlRE  = regexp.MustCompile(`[a-z]+://[^\s)>"'\x60]+`)
	mdRE   = regexp.MustCompile(`[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b`)
	testRE = regexp.MustCompile(`([A-Za-z0-9_./-]+_test\.go):((?:Test|Fuzz)[A-Za-z0-9_]*)`)
	linkRE = regexp.MustCompile(`\]\(([^)\s]+)\)`)
)

// citationErrors lists every Markdown path named in files (relative to root) that exists
// neither relative to root nor to the citing file, and is not a generated file.
func citationErrors(root string, files []string, generated map[string]string) []string {
	var out []string
	for _, f := range files {
		b, ok := readText(root, f)
		if !ok {
			continue
		}
		for i, line := range strings.Split(string(b), "\n") {
			line = urlRE.ReplaceAllString(line, "")
			for _, m := range slices.Compact(mdRE.FindAllString(line, -1)) {
				if strings.HasPrefix(m, "/") {
					continue // an installed location, not a repository path
				}
				if _, gen := generated[path.Clean(m)]; gen {
					continue
				}
				if !exists(root, m) && !exists(root, path.Join(path.Dir(f), m)) {
					out = append(out, f+":"+strconv.Itoa(i+1)+": cites "+m+", which is not in the repository")
				}
			}
		}
	}
	return out
}

// linkErrors checks, in the Markdown files among files, test references and relative links.
func linkErrors(root string, files []string) []string {
	var out []string
	for _, f := range files {
		if !strings.HasSuffix(f, ".md") {
			continue
		}
		b, ok := readText(root, f)
		if !ok {
			continue
		}
		for i, line := range strings.Split(string(b), "\n") {
			at := f + ":" + strconv.Itoa(i+1) + ": "
			for _, m := range testRE.FindAllStringSubmatch(line, -1) {
				file, name := m[1], m[2]
				src, err := os.ReadFile(filepath.Join(root, file))
				switch {
				case err != nil:
					out = append(out, at+"names "+m[0]+", but "+file+" is not in the repository")
				case !regexp.MustCompile(`(?m)^func ` + name + `\((t \*testing\.T|f \*testing\.F)\)`).Match(src):
					out = append(out, at+"names "+m[0]+", but "+file+" has no func "+name)
				}
			}
			for _, m := range linkRE.FindAllStringSubmatch(line, -1) {
				target := m[1]
				if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
					continue
				}
				p, anchor, _ := strings.Cut(target, "#")
				if p == "" {
					p = path.Base(f)
				}
				p = path.Join(path.Dir(f), p)
				if !exists(root, p) {
					out = append(out, at+"links "+target+", but "+p+" is not in the repository")
					continue
				}
				if anchor != "" && strings.HasSuffix(p, ".md") {
					if doc, _ := readText(root, p); !slices.Contains(anchors(doc), anchor) {
						out = append(out, at+"links "+target+": "+p+" has no heading with anchor \""+anchor+"\"")
					}
				}
			}
		}
	}
	return out
}

// anchors are the GitHub anchors of a Markdown file's headings: lower case, punctuation
// dropped, spaces turned into hyphens.
func anchors(doc []byte) []string {
	var out []string
	inCode := false
	for line := range strings.Lines(string(doc)) {
		if strings.HasPrefix(line, "```") {
			inCode = !inCode
		}
		if inCode || !strings.HasPrefix(line, "#") {
			continue
		}
		h := strings.TrimSpace(strings.TrimLeft(line, "#"))
		var a strings.Builder
		for _, r := range strings.ToLower(h) {
			switch {
			case unicode.IsLetter(r) || unicode.IsDigit(r) || r == '-' || r == '_':
				a.WriteRune(r)
			case r == ' ':
				a.WriteRune('-')
			}
		}
		out = append(out, a.String())
	}
	return out
}

func exists(root, p string) bool {
	if path.IsAbs(p) || strings.HasPrefix(path.Clean(p), "..") {
		return false // outside the repository
	}
	_, err := os.Stat(filepath.Join(root, filepath.FromSlash(p)))
	return err == nil
}

// readText reads a tracked file; ok is false for binary or large files.
func readText(root, f string) ([]byte, bool) {
	b, err := os.ReadFile(filepath.Join(root, f))
	if err != nil || len(b) > 4<<20 || bytes.IndexByte(b, 0) >= 0 || !utf8.Valid(b) {
		return nil, false
	}
	return b, true
}

// trackedFiles lists the repository's files, relative to the root: git's (tracked, and new
// files not ignored) when this is a git checkout, else every file under the root but hidden
// directories.
func trackedFiles(t *testing.T) []string {
	t.Helper()
	if out, err := exec.Command("git", "-C", repoRoot, "ls-files", "-z", "--cached", "--others", "--exclude-standard").Output(); err == nil {
		var files []string
		for _, f := range strings.Split(strings.TrimRight(string(out), "\x00"), "\x00") {
			if _, err := os.Lstat(filepath.Join(repoRoot, f)); err == nil {
				files = append(files, f)
			}
		}
		if len(files) > 0 {
			return files
		}
	}
	var files []string
	err := filepath.WalkDir(repoRoot, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && p != repoRoot && strings.HasPrefix(d.Name(), ".") {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			rel, err := filepath.Rel(repoRoot, p)
			if err != nil {
				return err
			}
			files = append(files, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}
