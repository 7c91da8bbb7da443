//go:build tools

// Package tools pins k8s.io/kubernetes so that `go build k8s.io/kubernetes/cmd/kube-apiserver`
// works from this module (see ../build.sh). Never compiled on its own.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
