// deploylint checks the deployment files offline, with the parsers Docker itself uses:
//
//	deploylint dockerfile PATH   BuildKit's Dockerfile checks (`docker build --check`), and
//	                             a JSON summary of the stages on stdout
//	deploylint compose PATH      the Compose Specification loader (`docker compose config`):
//	                             schema, interpolation, references; the normalised
//	                             project as JSON on stdout
//
// Problems go to stderr, one per line, and make the exit code 1. Nothing here talks to a
// Docker engine or a registry: base images are not pulled (their configuration is taken
// as empty).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
	"github.com/moby/buildkit/client/llb"
	"github.com/moby/buildkit/client/llb/sourceresolver"
	"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/linter"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerui"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: deploylint dockerfile|compose PATH")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "dockerfile":
		err = lintDockerfile(os.Args[2])
	case "compose":
		err = loadCompose(os.Args[2])
	default:
		err = fmt.Errorf("unknown check %q (dockerfile|compose)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// offlineResolver answers every base image with an empty linux/amd64 configuration.
type offlineResolver struct{}

func (offlineResolver) ResolveImageConfig(_ context.Context, ref string, _ sourceresolver.Opt) (string, digest.Digest, []byte, error) {
	config := []byte(`{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},"rootfs":{"type":"layers","diff_ids":[]}}`)
	return ref, digest.FromBytes(config), config, nil
}

type stage struct {
	Name        string   `json:"name"`
	Base        string   `json:"base"`
	User        string   `json:"user,omitempty"`
	Healthcheck []string `json:"healthcheck,omitempty"`
	Entrypoint  []string `json:"entrypoint,omitempty"`
	Cmd         []string `json:"cmd,omitempty"`
	Expose      []string `json:"expose,omitempty"`
	CopiesFrom  []string `json:"copies_from,omitempty"`
}

func lintDockerfile(path string) error {
	dt, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	ctx := context.Background()
	source := llb.Local("dockerfile")
	sourceMap := llb.NewSourceMap(&source, filepath.Base(path), "Dockerfile", dt)
	if sourceMap.Definition, err = source.Marshal(ctx); err != nil {
		return err
	}
	results, err := dockerfile2llb.DockerfileLint(ctx, dt, dockerfile2llb.ConvertOpt{
		Config:       dockerui.Config{LinterConfig: &linter.Config{ExperimentalAll: true}},
		SourceMap:    sourceMap,
		MetaResolver: offlineResolver{},
	})
	if err != nil {
		return err
	}
	problems := []string{}
	for _, w := range results.Warnings {
		line := 0
		if w.Location != nil && len(w.Location.Ranges) > 0 {
			line = int(w.Location.Ranges[0].Start.Line)
		}
		problems = append(problems, fmt.Sprintf("%s:%d: %s: %s (%s)", path, line, w.RuleName, w.Detail, w.URL))
	}
	if results.Error != nil {
		problems = append(problems, fmt.Sprintf("%s: %s", path, results.Error.Message))
	}

	ast, err := parser.Parse(strings.NewReader(string(dt)))
	if err != nil {
		return err
	}
	stages, _, err := instructions.Parse(ast.AST, nil)
	if err != nil {
		return err
	}
	var summary []stage
	for _, s := range stages {
		out := stage{Name: s.Name, Base: s.BaseName}
		for _, c := range s.Commands {
			switch c := c.(type) {
			case *instructions.UserCommand:
				out.User = c.User
			case *instructions.HealthCheckCommand:
				out.Healthcheck = c.Health.Test
			case *instructions.EntrypointCommand:
				out.Entrypoint = c.CmdLine
				if !c.PrependShell {
					out.Entrypoint = append([]string{"exec-form"}, c.CmdLine...)
				}
			case *instructions.CmdCommand:
				out.Cmd = c.CmdLine
			case *instructions.ExposeCommand:
				out.Expose = c.Ports
			case *instructions.CopyCommand:
				if c.From != "" {
					out.CopiesFrom = append(out.CopiesFrom, c.From+":"+strings.Join(c.SourcePaths, ",")+"->"+c.DestPath)
				}
			}
		}
		summary = append(summary, out)
	}
	if err := json.NewEncoder(os.Stdout).Encode(map[string]any{"stages": summary, "problems": problems}); err != nil {
		return err
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s", strings.Join(problems, "\n"))
	}
	return nil
}

func loadCompose(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	dt, err := os.ReadFile(abs)
	if err != nil {
		return err
	}
	project, err := loader.LoadWithContext(context.Background(), types.ConfigDetails{
		WorkingDir:  filepath.Dir(abs),
		ConfigFiles: []types.ConfigFile{{Filename: abs, Content: dt}},
		Environment: types.Mapping{},
	}, func(o *loader.Options) {
		o.SetProjectName("agent-bus", true)
	})
	if err != nil {
		return err
	}
	out, err := project.MarshalJSON()
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(append(out, '\n'))
	return err
}
