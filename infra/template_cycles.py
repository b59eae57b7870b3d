"""Fails if the SAM-transformed template has a dependency cycle between resources.

CloudFormation refuses such a stack at deploy time ("Circular dependency between resources"),
but neither `sam validate` nor cfn-lint looks for one in what SAM generates (an S3 event adds
the function to the bucket's notification configuration, so the function must not refer back to
the bucket).
"""
import re
import sys

from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse


class NoManagedPolicies:
    def load(self):
        return {}


def references(node, found):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Ref" and isinstance(value, str):
                found.add(value)
            elif key == "Fn::GetAtt":
                found.add(value[0] if isinstance(value, list) else value.split(".")[0])
            elif key == "Fn::Sub":
                text = value if isinstance(value, str) else value[0]
                found.update(m.split(".")[0] for m in re.findall(r"\$\{([^}!]+)\}", text))
                if isinstance(value, list):
                    references(value[1], found)
            else:
                references(value, found)
    elif isinstance(node, list):
        for item in node:
            references(item, found)


def main(path):
    text = open(path).read()
    # The translator wants S3 code locations; local paths are what `sam build` rewrites.
    text = re.sub(r"CodeUri: \S+", "CodeUri: s3://bucket/code.zip", text)
    resources = transform(yaml_parse(text), {}, NoManagedPolicies())["Resources"]
    deps = {}
    for name, resource in resources.items():
        found = set()
        references(resource.get("Properties", {}), found)
        depends = resource.get("DependsOn", [])
        found.update([depends] if isinstance(depends, str) else depends)
        deps[name] = sorted(found & resources.keys())
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in deps[node]:
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in deps:
        if name not in state:
            visit(name, [name])
    if cycles:
        for c in cycles:
            print("circular dependency: " + " -> ".join(c), file=sys.stderr)
        sys.exit(1)
    print(f"{len(resources)} resources, no dependency cycle")


if __name__ == "__main__":
    main(sys.argv[1])
