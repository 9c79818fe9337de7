// rewind_status calls a rewind coordinator from Go over mutual TLS: its health, the services it
// describes by reflection, the cluster's members, the newest rollbacks and the audit chain,
// printed as JSON. It is the Go twin of ../python/rewind_status.py.
//
// Generate the stubs into ./rewindv1 first (protoc, protoc-gen-go, protoc-gen-go-grpc), from
// the repository's root; the M options give the protos a Go package without editing them:
//
//	M="Mrewind/v1/types.proto=rewindclient/rewindv1,Mrewind/v1/control.proto=rewindclient/rewindv1"
//	M="$M,Mrewind/v1/agent.proto=rewindclient/rewindv1,Mrewind/v1/raft.proto=rewindclient/rewindv1"
//	M="$M,Mrewind/v1/join.proto=rewindclient/rewindv1"
//	protoc -I proto --go_out=docs/clients/go/rewindv1 --go_opt=paths=source_relative,$M \
//	    --go-grpc_out=docs/clients/go/rewindv1 --go-grpc_opt=paths=source_relative,$M \
//	    proto/rewind/v1/*.proto
//	mv docs/clients/go/rewindv1/rewind/v1/* docs/clients/go/rewindv1/
//	cd docs/clients/go && go mod tidy && go run . -coordinator 127.0.0.1:7443 -tls-dir /tmp/rewind-dev/tls
//
// Only the leader serves ControlService; a follower answers UNAVAILABLE with the leader's
// address in the `rewind-leader` trailing metadata, which this client follows (once).
//
// Exit status: 0 when the audit chain verifies, 1 when it does not, 2 on a usage or call error.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
	"unicode"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"

	rewindv1 "rewindclient/rewindv1"
)

const leaderMetadataKey = "rewind-leader"

type options struct {
	tlsDir, identity, serverName string
}

// dial opens a channel presenting the identity's certificate, trusting only the cluster's CA.
func dial(address string, o options) (*grpc.ClientConn, error) {
	certificate, err := tls.LoadX509KeyPair(
		filepath.Join(o.tlsDir, o.identity+".pem"), filepath.Join(o.tlsDir, o.identity+".key"))
	if err != nil {
		return nil, err
	}
	ca, err := os.ReadFile(filepath.Join(o.tlsDir, "ca.pem"))
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("%s holds no certificate", filepath.Join(o.tlsDir, "ca.pem"))
	}
	config := &tls.Config{
		Certificates: []tls.Certificate{certificate},
		RootCAs:      roots,
		// The coordinator's certificate names `localhost` and its addresses.
		ServerName: o.serverName,
		MinVersion: tls.VersionTLS12,
	}
	return grpc.Dial(address, grpc.WithTransportCredentials(credentials.NewTLS(config)))
}

func health(ctx context.Context, conn *grpc.ClientConn, service string) (string, error) {
	answer, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		return "", err
	}
	return answer.Status.String(), nil
}

// services lists what the member describes by reflection.
func services(ctx context.Context, conn *grpc.ClientConn) ([]string, error) {
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		return nil, err
	}
	request := &reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{ListServices: ""},
	}
	if err := stream.Send(request); err != nil {
		return nil, err
	}
	answer, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	_ = stream.CloseSend()
	var names []string
	for _, service := range answer.GetListServicesResponse().GetService() {
		names = append(names, service.Name)
	}
	sort.Strings(names)
	return names, nil
}

// printable shows a server's control characters as `?`: its words reach a terminal.
func printable(text string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return '?'
	}, text)
}

func run() (int, error) {
	coordinator := flag.String("coordinator", "127.0.0.1:7443", "a member's host:port")
	var o options
	flag.StringVar(&o.tlsDir, "tls-dir", "", "holds ca.pem, <identity>.pem and <identity>.key (required)")
	flag.StringVar(&o.identity, "identity", "operator", "certificate name in -tls-dir")
	flag.StringVar(&o.serverName, "server-name", "localhost", "name the member's certificate must carry")
	newest := flag.Uint("rollbacks", 5, "newest rollbacks to list")
	flag.Parse()
	if o.tlsDir == "" {
		return 2, errors.New("-tls-dir is required")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	address := *coordinator
	conn, err := dial(address, o)
	if err != nil {
		return 2, err
	}
	report := map[string]any{"member": address}
	if report["health"], err = health(ctx, conn, ""); err != nil {
		return 2, err
	}
	if report["control_service"], err = health(ctx, conn, "rewind.v1.ControlService"); err != nil {
		return 2, err
	}
	if report["services"], err = services(ctx, conn); err != nil {
		return 2, err
	}

	control := rewindv1.NewControlServiceClient(conn)
	var trailer metadata.MD
	members, err := control.ListMembers(ctx, &rewindv1.ListMembersRequest{}, grpc.Trailer(&trailer))
	if leader := trailer.Get(leaderMetadataKey); status.Code(err) == codes.Unavailable && len(leader) > 0 {
		conn.Close()
		address = leader[0]
		if conn, err = dial(address, o); err != nil {
			return 2, err
		}
		control = rewindv1.NewControlServiceClient(conn)
		members, err = control.ListMembers(ctx, &rewindv1.ListMembersRequest{})
	}
	if err != nil {
		return 2, err
	}
	defer conn.Close()
	report["leader"] = address
	var memberList []map[string]any
	for _, member := range members.Members {
		memberList = append(memberList, map[string]any{"id": member.Id, "address": member.Address, "role": member.Role})
	}
	report["members"] = memberList

	rollbacks, err := control.ListRollbacks(ctx, &rewindv1.ListRollbacksRequest{PageSize: uint32(*newest)})
	if err != nil {
		return 2, err
	}
	var rollbackList []map[string]any
	for _, rollback := range rollbacks.Rollbacks {
		rollbackList = append(rollbackList, map[string]any{
			"rollback_id": rollback.RollbackId,
			"service":     rollback.Service,
			// Enum values by name, as rewindctl --output json prints them.
			"state": rollback.State.String(),
			"steps": len(rollback.Steps),
		})
	}
	report["rollbacks"] = rollbackList

	audit, err := control.VerifyAudit(ctx, &rewindv1.VerifyAuditRequest{})
	if err != nil {
		return 2, err
	}
	report["audit"] = map[string]any{"ok": audit.Ok, "entries": audit.Entries, "head_hash": audit.HeadHash}
	out, err := json.MarshalIndent(report, "", "  ")
	if err != nil {
		return 2, err
	}
	fmt.Println(string(out))
	if !audit.Ok {
		return 1, nil
	}
	return 0, nil
}

func main() {
	code, err := run()
	if err != nil {
		if answer, ok := status.FromError(err); ok {
			fmt.Fprintf(os.Stderr, "rewind_status: %s: %s\n", answer.Code(), printable(answer.Message()))
		} else {
			fmt.Fprintf(os.Stderr, "rewind_status: %s\n", printable(err.Error()))
		}
	}
	os.Exit(code)
}
