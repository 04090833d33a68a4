// usage: node validate.mjs FILE...  (one Kubernetes object per file, YAML)
// Exits 1 naming the file and the schema error when an object is invalid.
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const kinds = { ServiceMonitor, ScaledObject };
let bad = 0;
for (const file of process.argv.slice(2)) {
  const obj = yaml.load(readFileSync(file, "utf8"));
  const Model = kinds[obj.kind];
  if (!Model) {
    console.log(`${file}: no schema for kind ${obj.kind}`);
    bad++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`${file}: ${obj.kind} ${obj.metadata.name} valid`);
  } catch (e) {
    console.log(`${file}: ${obj.kind} invalid: ${e.message}`);
    bad++;
  }
}
process.exit(bad ? 1 : 0);
