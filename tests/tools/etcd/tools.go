//go:build tools

// Package tools pins the etcd server so that `go build go.etcd.io/etcd/server/v3`
// works from this module (see ../build.sh). `go install go.etcd.io/etcd/server/v3@v3.7.3`
// does not work because that module's go.mod contains replace directives.
package tools

import _ "go.etcd.io/etcd/server/v3"
