#!/usr/bin/env python3
"""Checks rendered Trine Kubernetes manifests (validate.sh runs it).

    check_manifests.py --repo DIR --kube-versions "1.33.0 1.37.0" [--trine-bin PATH]
                       --target NAME=RENDERED.yaml ... [--file PATH ...]

For every object of every target (a `kubectl kustomize` output) and every
extra file:
  - JSON-schema validation with kubernetes-validate against each Kubernetes
    version, strict (unknown fields are errors); a kind without a schema is
    an error, except the CRD kinds in CRD_KINDS, which are skipped and said so;
  - Trine's own rules: ports (the node's defaults from `trine node
    --print-config`), probes (/healthz and /readyz on the port named http),
    security context, settings names and values, peer Service, seed pod,
    Services, NetworkPolicy, PodDisruptionBudget, ServiceMonitor;
  - with the binary: start.sh run as the pods would run it (issuing a
    certificate from a throwaway CA, then `trine node ... --print-config`
    instead of the node), for the seed pod and a joining pod.
Exits 1 naming the target, object and source file of every failure.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

import kubernetes_validate
from kubernetes_validate import utils as kv_utils

# Kinds from CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# No schema for the ServiceMonitor CRD here: its field names instead
# (monitoring.coreos.com/v1), so a typo in one fails. Add a field the CRD
# has if you use it.
SERVICEMONITOR_FIELDS = {
    "spec": {"jobLabel", "targetLabels", "podTargetLabels", "endpoints", "selector",
             "selectorMechanism", "namespaceSelector", "sampleLimit", "scrapeProtocols",
             "fallbackScrapeProtocol", "targetLimit", "labelLimit", "labelNameLengthLimit",
             "labelValueLengthLimit", "keepDroppedTargets", "attachMetadata", "scrapeClass",
             "bodySizeLimit", "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor",
             "convertClassicHistogramsToNHCB", "scrapeClassicHistograms", "serviceDiscoveryRole"},
    "endpoint": {"port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
                 "tlsConfig", "bearerTokenFile", "bearerTokenSecret", "authorization", "honorLabels",
                 "honorTimestamps", "trackTimestampsStaleness", "basicAuth", "oauth2",
                 "metricRelabelings", "relabelings", "proxyUrl", "noProxy", "proxyFromEnvironment",
                 "proxyConnectHeader", "followRedirects", "enableHttp2", "filterRunning"},
    "relabeling": {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"},
}
# The node's defaults when no binary is at hand (`trine node --print-config`).
FALLBACK_PORTS = {"grpc": 7400, "http": 7401, "p2p": 7402, "raft": 7403}
ORIGIN = "config.kubernetes.io/origin"
# TRINE_* variables that are not `trine node` settings.
CLIENT_VARS = {"TRINE_NODE"}
STATE_MOUNT = "/var/lib/trine"
# The image's shell is busybox sh: use it when this machine has busybox.
SHELL = ["busybox", "sh"] if shutil.which("busybox") else ["sh"]
IMAGE_USER = 10001
MIN_STARTUP_S = 300


class Checker:
    def __init__(self, repo, versions, trine_bin):
        self.repo = repo
        self.versions = versions
        self.trine_bin = trine_bin
        self.failures = []
        self.notes = []
        self.counts = {}
        self.defaults = None
        self.ports = dict(FALLBACK_PORTS)
        self.known_keys = None

    # --- reporting -------------------------------------------------------

    def where(self, target, obj):
        kind = obj.get("kind", "?")
        name = (obj.get("metadata") or {}).get("name", "?")
        origin = ((obj.get("metadata") or {}).get("annotations") or {}).get(ORIGIN)
        src = ""
        if origin:
            try:
                o = yaml.safe_load(origin) or {}
                path = o.get("path") or o.get("configuredIn")
                if path:
                    src = os.path.relpath(os.path.normpath(os.path.join(target["dir"], path)), self.repo)
            except yaml.YAMLError:
                pass
        return f"{target['name']}: {kind}/{name}" + (f" (from {src})" if src else "")

    def fail(self, target, obj, msg):
        self.failures.append(f"{self.where(target, obj)}: {msg}")

    # --- the binary --------------------------------------------------------

    def load_defaults(self):
        if not self.trine_bin:
            self.notes.append(
                "no trine binary (TRINE_BIN, target/{release,debug}/trine, PATH): ports checked "
                f"against built-in defaults {FALLBACK_PORTS}, settings names and start.sh not checked"
            )
            return
        r = subprocess.run(
            [self.trine_bin, "node", "--print-config"],
            capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        if r.returncode != 0:
            raise SystemExit(f"validate: {self.trine_bin} node --print-config failed ({r.returncode}): {r.stderr.strip()}")
        self.defaults = parse_toml(r.stdout)
        d = self.defaults
        self.ports = {
            "grpc": port_of(d["grpc_addr"]),
            "http": port_of(d["http_addr"]),
            "p2p": p2p_port(d["p2p_listen"][0]),
            "raft": port_of(d["raft_addr"]),
        }
        self.known_keys = {"TRINE_" + k.upper() for k in d}

    # --- schema ----------------------------------------------------------

    def schema(self, target, obj):
        clean = strip_origin(obj)
        key = (obj.get("apiVersion"), obj.get("kind"))
        for v in self.versions:
            try:
                kv_utils.validate(clean, v, strict=True)
            except kv_utils.SchemaNotFoundError:
                if key in CRD_KINDS:
                    self.notes.append(f"{self.where(target, obj)}: no schema for CRD kind {key[1]} ({key[0]}): Kubernetes schema check skipped, field names checked instead")
                else:
                    self.fail(target, obj, f"no schema for apiVersion {key[0]} kind {key[1]} in Kubernetes {v} (a typo, or a CRD kind missing from CRD_KINDS)")
                return
            except kv_utils.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(top)"
                self.fail(target, obj, f"invalid for Kubernetes {v}: {path}: {e.message}")
            except kv_utils.VersionNotSupportedError:
                raise SystemExit(f"validate: kubernetes-validate {kubernetes_validate.__version__} has no schemas for Kubernetes {v}")

    # --- Trine rules -------------------------------------------------------

    def check_target(self, target, objs):
        n = 0
        for obj in objs:
            self.schema(target, obj)
            n += 1
        self.counts[target["name"]] = n
        by_kind = {}
        for o in objs:
            by_kind.setdefault(o.get("kind"), []).append(o)
        configmaps = {o["metadata"]["name"]: o for o in by_kind.get("ConfigMap", [])}
        services = by_kind.get("Service", [])
        stss = by_kind.get("StatefulSet", [])
        if target["app"] and not stss:
            self.failures.append(f"{target['name']}: no StatefulSet in the build")
        pods = []  # (sts, pod template labels, container ports by name)
        for sts in stss:
            pods.append(self.check_statefulset(target, sts, configmaps, services))
        self.check_seed(target, stss, configmaps)
        self.check_services(target, services, pods)
        for np in by_kind.get("NetworkPolicy", []):
            self.check_networkpolicy(target, np, pods)
        for pdb in by_kind.get("PodDisruptionBudget", []):
            self.check_pdb(target, pdb, pods)
        for sm in by_kind.get("ServiceMonitor", []):
            self.check_servicemonitor(target, sm, services)
        if self.trine_bin:
            for sts in stss:
                self.simulate(target, sts, configmaps)

    def check_statefulset(self, target, sts, configmaps, services):
        f = lambda msg: self.fail(target, sts, msg)
        spec = sts.get("spec", {})
        tmpl = spec.get("template", {})
        pod = tmpl.get("spec", {})
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        if spec.get("podManagementPolicy") != "Parallel":
            f("podManagementPolicy must be Parallel")
        if pod.get("enableServiceLinks") is not False:
            f("enableServiceLinks must be false (Service `trine` would inject TRINE_* variables)")
        psc = pod.get("securityContext") or {}
        for k, want in (("runAsNonRoot", True), ("runAsUser", IMAGE_USER), ("fsGroup", IMAGE_USER)):
            if psc.get(k) != want:
                f(f"spec.template.spec.securityContext.{k} is {psc.get(k)!r}, want {want!r}")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            f("spec.template.spec.securityContext.seccompProfile.type must be RuntimeDefault")
        keys = {c.get("topologyKey") for c in pod.get("topologySpreadConstraints") or []}
        for k in ("topology.kubernetes.io/region", "topology.kubernetes.io/zone"):
            if k not in keys:
                f(f"no topologySpreadConstraint on {k}")
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates") or []}
        containers = pod.get("containers") or []
        for c in (pod.get("initContainers") or []) + containers:
            where = f"container {c.get('name')}"
            sc = c.get("securityContext") or {}
            if sc.get("readOnlyRootFilesystem") is not True:
                f(f"{where}: securityContext.readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                f(f"{where}: securityContext.allowPrivilegeEscalation must be false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                f(f"{where}: securityContext.capabilities.drop must include ALL")
            res = c.get("resources") or {}
            if not res.get("requests") or not res.get("limits"):
                f(f"{where}: resources.requests and resources.limits must be set")
            mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts") or []}
            tmp = volumes.get(mounts.get("/tmp"), {})
            if (tmp.get("emptyDir") or {}).get("medium") != "Memory":
                f(f"{where}: /tmp must be an emptyDir with medium Memory")
            if mounts.get(STATE_MOUNT) not in claims:
                f(f"{where}: {STATE_MOUNT} must be a volumeClaimTemplate")
        trine = [c for c in containers if c.get("name") == "trine"]
        if not trine:
            f("no container named trine")
            return (sts, labels, {})
        c = trine[0]
        ports = {}
        for p in c.get("ports") or []:
            ports[p.get("name")] = p.get("containerPort")
            if p.get("protocol", "TCP") != "TCP":
                f(f"container port {p.get('name')} must be TCP")
        for name, want in self.ports.items():
            if ports.get(name) != want:
                f(f"container port {name} is {ports.get(name)}, want {want} (the node's default)")
        if ports.get("http") != 7401:
            f(f"the port named http is {ports.get('http')}, must be 7401")
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/readyz")):
            pr = c.get(probe)
            if not pr:
                f(f"container trine has no {probe}")
                continue
            hg = pr.get("httpGet") or {}
            if hg.get("path") != path or hg.get("port") != "http":
                f(f"{probe} must be httpGet {path} on port http, is {hg.get('path')!r} on {hg.get('port')!r}")
        sp = c.get("startupProbe") or {}
        budget = sp.get("failureThreshold", 3) * sp.get("periodSeconds", 10)
        if budget < MIN_STARTUP_S:
            f(f"startupProbe allows {budget}s, want at least {MIN_STARTUP_S}s (failureThreshold x periodSeconds)")
        env = self.pod_env(target, sts, c, configmaps)
        if env is None:
            return (sts, labels, ports)
        for k in sorted(env):
            if k.startswith("TRINE_") and k not in CLIENT_VARS and self.known_keys is not None and k not in self.known_keys:
                f(f"{k} is not a `trine node` setting (the node ignores unknown TRINE_* variables): see `trine node --print-config`")
        want_env = {
            "TRINE_GRPC_ADDR": f"0.0.0.0:{self.ports['grpc']}",
            "TRINE_HTTP_ADDR": f"0.0.0.0:{self.ports['http']}",
            "TRINE_RAFT_ADDR": f"0.0.0.0:{self.ports['raft']}",
            "TRINE_P2P_LISTEN": f"/ip4/0.0.0.0/tcp/{self.ports['p2p']}",
        }
        for k, want in want_env.items():
            if env.get(k) != want:
                f(f"{k} is {env.get(k)!r}, want {want!r}")
        data_dir = env.get("TRINE_DATA_DIR", "")
        if not data_dir.startswith(STATE_MOUNT + "/"):
            f(f"TRINE_DATA_DIR is {data_dir!r}: it must be a directory inside {STATE_MOUNT} (the volume's root holds lost+found and the tls dir, which the node refuses)")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        shutdown = duration_s(env.get("TRINE_SHUTDOWN_TIMEOUT", "10s"))
        if shutdown is None or shutdown >= grace:
            f(f"TRINE_SHUTDOWN_TIMEOUT ({env.get('TRINE_SHUTDOWN_TIMEOUT')}) must be shorter than terminationGracePeriodSeconds ({grace})")
        svc_name = spec.get("serviceName")
        if env.get("PEER_SERVICE", "trine-peers") != svc_name:
            f(f"PEER_SERVICE ({env.get('PEER_SERVICE')}) differs from serviceName ({svc_name})")
        peer = [s for s in services if s["metadata"]["name"] == svc_name]
        if not peer:
            f(f"serviceName {svc_name!r}: no such Service in the build")
        else:
            s = peer[0]["spec"]
            if s.get("clusterIP") != "None" or s.get("publishNotReadyAddresses") is not True:
                self.fail(target, peer[0], "the peer Service must be headless (clusterIP: None) with publishNotReadyAddresses: true")
            names = {p.get("name") for p in s.get("ports") or []}
            for need in ("p2p", "raft"):
                if need not in names:
                    self.fail(target, peer[0], f"no port named {need}")
        return (sts, labels, ports)

    def pod_env(self, target, sts, c, configmaps):
        env = {}
        for ef in c.get("envFrom") or []:
            ref = (ef.get("configMapRef") or {}).get("name")
            if ref is None:
                continue
            cm = configmaps.get(ref)
            if cm is None:
                self.fail(target, sts, f"envFrom ConfigMap {ref!r} is not in the build")
                return None
            env.update(cm.get("data") or {})
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = e["value"]
            else:
                env.setdefault(e["name"], None)
        return env

    def check_seed(self, target, stss, configmaps):
        seeds = {}
        for sts in stss:
            c = [c for c in sts["spec"]["template"]["spec"].get("containers", []) if c.get("name") == "trine"]
            env = self.pod_env(target, sts, c[0], configmaps) if c else None
            if env is None:
                continue
            seeds.setdefault(env.get("SEED_POD", "trine-0"), []).append(sts)
        for seed, group in seeds.items():
            pods = [f"{s['metadata']['name']}-{i}" for s in group for i in range(s["spec"].get("replicas", 1))]
            if seed not in pods:
                for s in group:
                    self.fail(target, s, f"SEED_POD {seed!r} is none of the pods ({', '.join(pods)}): no pod would start the cluster with --init")

    def check_services(self, target, services, pods):
        for svc in services:
            sel = svc["spec"].get("selector") or {}
            matched = [p for p in pods if selects(sel, p[1])]
            if not matched:
                self.fail(target, svc, f"selector {sel} matches no StatefulSet's pods")
                continue
            for port in svc["spec"].get("ports") or []:
                tp = port.get("targetPort", port.get("port"))
                for sts, _, cports in matched:
                    ok = tp in cports if isinstance(tp, str) else tp in cports.values()
                    if not ok:
                        self.fail(target, svc, f"port {port.get('name')}: targetPort {tp!r} is not a port of {sts['metadata']['name']}'s trine container")
                want = self.ports.get(port.get("name"))
                if want is not None and port.get("port") != want:
                    self.fail(target, svc, f"port {port.get('name')} is {port.get('port')}, want {want}")
        client = [s for s in services if s["metadata"]["name"] == "trine"]
        if pods and client:
            names = {p.get("name"): p.get("port") for p in client[0]["spec"].get("ports") or []}
            if names.get("grpc") != self.ports["grpc"] or names.get("http") != self.ports["http"]:
                self.fail(target, client[0], f"client Service must expose grpc {self.ports['grpc']} and http {self.ports['http']}, has {names}")
        elif pods:
            self.failures.append(f"{target['name']}: no client Service named trine")

    def check_networkpolicy(self, target, np, pods):
        sel = (np["spec"].get("podSelector") or {}).get("matchLabels") or {}
        if not any(selects(sel, p[1]) for p in pods):
            self.fail(target, np, "podSelector matches no Trine pods")
        trine_labels = [p[1] for p in pods]
        port_names = {v: k for k, v in self.ports.items()}
        opened = set()
        for rule in np["spec"].get("ingress") or []:
            names = set()
            for p in rule.get("ports") or []:
                v = p.get("port")
                names.add(v if isinstance(v, str) else port_names.get(v, str(v)))
            if not rule.get("ports"):
                names = set(self.ports)
            opened |= names
            if names & {"p2p", "raft"}:
                for peer in rule.get("from") or [{}]:
                    ps = peer.get("podSelector")
                    only_trine = (
                        set(peer) == {"podSelector"}
                        and ps
                        and (ps.get("matchLabels") or ps.get("matchExpressions"))
                        and all(selects(ps.get("matchLabels") or {}, l) for l in trine_labels)
                        and not ps.get("matchExpressions")
                    )
                    if not only_trine:
                        self.fail(target, np, f"ports {sorted(names & {'p2p', 'raft'})} are open to {peer or 'everyone'}: only Trine pods may reach p2p and raft")
        for need in ("grpc", "http"):
            if need not in opened:
                self.fail(target, np, f"no ingress rule opens {need}")

    def check_pdb(self, target, pdb, pods):
        if pdb["spec"].get("maxUnavailable") != 1:
            self.fail(target, pdb, "maxUnavailable must be 1")
        sel = (pdb["spec"].get("selector") or {}).get("matchLabels") or {}
        if not pods or not all(selects(sel, p[1]) for p in pods):
            self.fail(target, pdb, "selector must cover the pods of every Trine StatefulSet")

    def check_servicemonitor(self, target, sm, services):
        spec = sm.get("spec") or {}
        unknown = [f"spec.{k}" for k in spec if k not in SERVICEMONITOR_FIELDS["spec"]]
        for i, ep in enumerate(spec.get("endpoints") or []):
            unknown += [f"spec.endpoints.{i}.{k}" for k in ep if k not in SERVICEMONITOR_FIELDS["endpoint"]]
            for field in ("relabelings", "metricRelabelings"):
                for j, rl in enumerate(ep.get(field) or []):
                    unknown += [f"spec.endpoints.{i}.{field}.{j}.{k}" for k in rl if k not in SERVICEMONITOR_FIELDS["relabeling"]]
        for u in unknown:
            self.fail(target, sm, f"{u}: not a ServiceMonitor field (SERVICEMONITOR_FIELDS in check_manifests.py)")
        sel = ((sm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        hits = [s for s in services if selects(sel, (s["metadata"].get("labels") or {}))]
        if not hits:
            self.fail(target, sm, f"selector {sel} matches no Service")
            return
        for ep in sm["spec"].get("endpoints") or []:
            for s in hits:
                if ep.get("port") not in {p.get("name") for p in s["spec"].get("ports") or []}:
                    self.fail(target, sm, f"endpoint port {ep.get('port')!r} is not a port of Service {s['metadata']['name']}")

    # --- start.sh, run as the pods would ---------------------------------

    def simulate(self, target, sts, configmaps):
        spec = sts["spec"]
        pod = spec["template"]["spec"]
        scripts = None
        for v in pod.get("volumes") or []:
            if v.get("name") == "scripts" and v.get("configMap"):
                scripts = configmaps.get(v["configMap"]["name"])
        if scripts is None or "start.sh" not in (scripts.get("data") or {}):
            self.fail(target, sts, "no ConfigMap with start.sh mounted as volume `scripts`")
            return
        c = [c for c in pod["containers"] if c["name"] == "trine"][0]
        base_env = self.pod_env(target, sts, c, configmaps)
        if base_env is None:
            return
        seed = base_env.get("SEED_POD", "trine-0")
        svc = base_env.get("PEER_SERVICE", "trine-peers")
        name = sts["metadata"]["name"]
        replicas = spec.get("replicas", 1)
        with tempfile.TemporaryDirectory(prefix="trine-k8s-check.") as tmp:
            script = os.path.join(tmp, "start.sh")
            with open(script, "w") as fh:
                fh.write(scripts["data"]["start.sh"])
            wrapper = os.path.join(tmp, "trine")
            with open(wrapper, "w") as fh:
                fh.write('#!/bin/sh\n'
                         'if [ "$1" = node ] && [ "$2" != --help ]; then exec "$TRINE_REAL" "$@" --print-config; fi\n'
                         'exec "$TRINE_REAL" "$@"\n')
            os.chmod(wrapper, 0o755)
            ca = os.path.join(tmp, "ca")
            r = subprocess.run([self.trine_bin, "certs", "init", "--ca-dir", ca], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"validate: trine certs init failed: {r.stderr.strip()}")
            # Secret trine-admin-token as the kubelet mounts it with fsGroup:
            # group-readable, which start.sh must copy to a 0600 file.
            admin = os.path.join(tmp, "admin")
            os.makedirs(admin)
            r = subprocess.run([self.trine_bin, "token", "secret", "--out", os.path.join(admin, "token")],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"validate: trine token secret failed: {r.stderr.strip()}")
            os.chmod(os.path.join(admin, "token"), 0o440)
            for i in sorted({0, replicas - 1}):
                pod_name = f"{name}-{i}"
                tls = os.path.join(tmp, pod_name, "tls")
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TRINE_REAL": self.trine_bin,
                       "TRINE": wrapper, "CA_DIR": ca}
                # Pod 0 as on a cluster without topology labels on pods,
                # the last pod as on one with them.
                labelled = i > 0
                samples = {"POD_NAME": pod_name, "POD_NAMESPACE": "default", "POD_IP": f"10.0.0.{10 + i}",
                           "TOPOLOGY_REGION": "label-region" if labelled else "",
                           "TOPOLOGY_ZONE": "label-region-a" if labelled else ""}
                for k, v in base_env.items():
                    env[k] = samples.get(k, "") if v is None else expand(v, env)
                env["TRINE_TLS_DIR"] = tls
                env["ADMIN_TOKEN_DIR"] = admin
                if not env.get("TRINE_ADMIN_TOKEN_FILE", "").startswith("/tmp/"):
                    self.fail(target, sts, f"TRINE_ADMIN_TOKEN_FILE is {env.get('TRINE_ADMIN_TOKEN_FILE')!r}: it must be in the pod's memory-backed /tmp")
                env["TRINE_ADMIN_TOKEN_FILE"] = os.path.join(tmp, pod_name, "admin.token")
                os.makedirs(os.path.dirname(tls), exist_ok=True)
                label = f"start.sh for pod {pod_name}"
                for mode in ("certs", "node"):
                    r = subprocess.run(SHELL + [script, mode], capture_output=True, text=True, env=env, timeout=60)
                    if r.returncode != 0:
                        tail = " | ".join([l for l in r.stderr.splitlines() if l.strip()][-3:])
                        self.fail(target, sts, f"{label}: `start.sh {mode}` exited {r.returncode}: {tail}")
                        break
                else:
                    self.check_node_config(target, sts, label, parse_toml(r.stdout), pod_name, seed, svc, env)
                    copied = env["TRINE_ADMIN_TOKEN_FILE"]
                    if not os.path.exists(copied) or os.stat(copied).st_mode & 0o777 != 0o600:
                        self.fail(target, sts, f"{label}: start.sh did not copy the admin token to a 0600 file")

    def check_node_config(self, target, sts, label, got, pod, seed, svc, env):
        f = lambda msg: self.fail(target, sts, f"{label}: {msg}")
        p = self.ports
        if got.get("name") != pod:
            f(f"name is {got.get('name')!r}, want {pod!r}")
        if got.get("raft_announce") != f"{pod}.{svc}:{p['raft']}":
            f(f"raft_announce is {got.get('raft_announce')!r}")
        if got.get("p2p_announce") != [f"/dns4/{pod}.{svc}/tcp/{p['p2p']}"]:
            f(f"p2p_announce is {got.get('p2p_announce')!r}")
        if pod == seed:
            if got.get("init") is not True or got.get("join"):
                f(f"the seed pod must run with --init and no --join (init={got.get('init')}, join={got.get('join')})")
        else:
            if got.get("init") or got.get("join") != [f"{seed}.{svc}:{p['raft']}"]:
                f(f"must join {seed}.{svc}:{p['raft']} without --init (init={got.get('init')}, join={got.get('join')})")
            if got.get("bootstrap") != [f"/dns4/{seed}.{svc}/tcp/{p['p2p']}"]:
                f(f"bootstrap is {got.get('bootstrap')!r}")
        for k, port in (("grpc", p["grpc"]), ("http", p["http"])):
            # The node is told this pod's DNS name and keeps 0.0.0.0.
            want_addr, want_ann = f"0.0.0.0:{port}", f"{pod}.{svc}:{port}"
            if got.get(f"{k}_announce") != want_ann:
                f(f"{k}_announce is {got.get(k + '_announce')!r}, want {want_ann!r}")
            if got.get(f"{k}_addr") != want_addr:
                f(f"{k}_addr is {got.get(k + '_addr')!r}, want {want_addr!r}")
        want_region = env.get("TRINE_REGION") or env.get("TOPOLOGY_REGION") or (self.defaults or {}).get("region")
        if got.get("region") != want_region:
            f(f"region is {got.get('region')!r}, want {want_region!r}")
        want_zone = env.get("TRINE_ZONE") or env.get("TOPOLOGY_ZONE") or ""
        if got.get("zone") != want_zone:
            f(f"zone is {got.get('zone')!r}, want {want_zone!r}")
        if not str(got.get("data_dir", "")).startswith(STATE_MOUNT + "/"):
            f(f"data_dir is {got.get('data_dir')!r}")
        if got.get("admin_token_file") != env.get("TRINE_ADMIN_TOKEN_FILE"):
            f(f"admin_token_file is {got.get('admin_token_file')!r}, want {env.get('TRINE_ADMIN_TOKEN_FILE')!r}")


# --- helpers ---------------------------------------------------------------

def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


def p2p_port(multiaddr):
    m = re.search(r"/tcp/(\d+)", multiaddr)
    return int(m.group(1)) if m else None


def duration_s(s):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", str(s).strip())
    if not m:
        return None
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def expand(value, env):
    """Kubernetes $(VAR) expansion of an env value from earlier variables."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def parse_toml(text):
    if tomllib is not None:
        return tomllib.loads(text)
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(\w+) = (.*)$', line)
        if m:
            v = m.group(2)
            out[m.group(1)] = yaml.safe_load(v)
    return out


def strip_origin(obj):
    meta = dict(obj.get("metadata") or {})
    ann = dict(meta.get("annotations") or {})
    ann.pop(ORIGIN, None)
    if ann:
        meta["annotations"] = ann
    else:
        meta.pop("annotations", None)
    out = dict(obj)
    out["metadata"] = meta
    return out


def load(path):
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--kube-versions", required=True)
    ap.add_argument("--trine-bin", default="")
    ap.add_argument("--target", action="append", default=[], help="NAME=RENDERED.yaml (rendered from a wrapper in DIR=dirname)")
    ap.add_argument("--file", action="append", default=[], help="a plain manifest file")
    a = ap.parse_args()
    started = time.monotonic()
    versions = [v for v in re.split(r"[\s,]+", a.kube_versions) if v]
    ck = Checker(a.repo, versions, a.trine_bin)
    ck.load_defaults()
    for t in a.target:
        name, path = t.split("=", 1)
        target = {"name": name, "dir": os.path.dirname(path), "app": True}
        ck.check_target(target, load(path))
    for path in a.file:
        rel = os.path.relpath(path, a.repo)
        target = {"name": rel, "dir": os.path.dirname(path), "app": False}
        objs = load(path)
        for o in objs:
            ck.schema(target, o)
        ck.counts[rel] = len(objs)
    for n in ck.notes:
        print(f"validate: note: {n}")
    if ck.failures:
        for msg in ck.failures:
            print(f"validate: FAIL {msg}", file=sys.stderr)
        print(f"validate: {len(ck.failures)} failure(s)", file=sys.stderr)
        return 1
    objs = sum(ck.counts.values())
    print(f"validate: {objs} objects in {len(ck.counts)} builds/files valid against Kubernetes "
          f"{', '.join(ck.versions)} (strict, kubernetes-validate {kubernetes_validate.__version__}); "
          f"ports {ck.ports['grpc']}/{ck.ports['http']}/{ck.ports['p2p']}/{ck.ports['raft']} "
          f"{'from ' + ck.trine_bin + ' --print-config' if ck.trine_bin else '(built-in defaults)'}; "
          f"{'start.sh run (' + ' '.join(SHELL) + ') for seed and joining pods' if ck.trine_bin else 'start.sh not run'} "
          f"({time.monotonic() - started:.1f}s)")
    for name, n in ck.counts.items():
        print(f"  ok  {name}: {n} object{'s' if n != 1 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
