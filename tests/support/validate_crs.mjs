// Validates custom resources (KEDA's ScaledObject, Prometheus Operator's ServiceMonitor and
// PrometheusRule) against their CRDs' schemas, with the validators the @kubernetes-models
// npm packages generate from them. Used by tests/support/helm.py:
//   node validate_crs.mjs <node_modules folder>  < manifests.json
// Reads a JSON list of manifests on stdin; prints "kind/name: problem" per invalid object
// and exits 1 when there is one. Objects of other kinds are left to kubernetes-validate;
// a custom kind this script does not know is a problem (add its validator here).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const root = process.argv[2];
const MODELS = {
  "keda.sh/v1alpha1": {
    ScaledObject: "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject.js",
  },
  "monitoring.coreos.com/v1": {
    ServiceMonitor: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js",
    PrometheusRule: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule.js",
  },
};
const CORE = /^(v1|apps\/v1|autoscaling\/v2|policy\/v1|networking\.k8s\.io\/v1|batch\/v1)$/;

const docs = JSON.parse(readFileSync(0, "utf8"));
let problems = 0;
for (const doc of docs) {
  const where = `${doc.kind}/${doc.metadata?.name}`;
  if (CORE.test(doc.apiVersion)) continue;
  const path = MODELS[doc.apiVersion]?.[doc.kind];
  if (!path) {
    console.log(`${where}: no validator for ${doc.apiVersion} ${doc.kind}`);
    problems++;
    continue;
  }
  const module = await import(pathToFileURL(join(root, path)).href);
  try {
    new module[doc.kind](doc).validate();
  } catch (err) {
    console.log(`${where}: ${err.message}`);
    problems++;
  }
}
process.exit(problems ? 1 : 0);
