"""The real seldon-deploy-sdk, given NO token, calling the platform through seldon-auth-proxy.

SELDON_URL is the proxy's base URL (http://127.0.0.1:PORT); the SDK's host is SELDON_URL + the API root.
EXPECT_USER, when set, is the Id that read_user must report (the identity the proxy lends).
Prints one progress line per call and, last, "SDK through proxy: all checks passed".
"""
import os
import sys
import uuid

import seldon_deploy_sdk as sdk
from seldon_deploy_sdk.rest import ApiException


def client():
    c = sdk.Configuration()
    c.host = os.environ["SELDON_URL"] + "/seldon-deploy/api/v1alpha1"
    # No token at all: the SDK then sends "Authorization: Bearer " and the proxy supplies the credential.
    assert not c.id_token, "the SDK must run without a token here"
    return sdk.ApiClient(c)


api = client()
envapi = sdk.EnvironmentApi(api)
sdeps = sdk.SeldonDeploymentsApi(api)
ns = "seldon"
name = "iris-" + uuid.uuid4().hex[:6]

user = envapi.read_user()
print("read_user:", user.id, flush=True)
expected = os.environ.get("EXPECT_USER")
if expected is not None:
    assert user.id == expected, f"read_user says {user.id!r}, expected {expected!r}"
version = envapi.read_version()
print("read_version:", version.build_version, flush=True)
assert version.build_version, "read_version returned no build version"

listed = sdeps.list_seldon_deployments(ns)
before = len(listed.items or [])
print("list before:", before, flush=True)

mldeployment = sdk.SeldonDeployment(
    api_version="machinelearning.seldon.io/v1",
    kind="SeldonDeployment",
    metadata=sdk.ObjectMeta(name=name, namespace=ns, labels={"team": "dev"}),
    spec=sdk.SeldonDeploymentSpec(
        name=name,
        predictors=[
            sdk.PredictorSpec(
                name="default",
                replicas=1,
                graph=sdk.PredictiveUnit(
                    name="classifier",
                    implementation="SKLEARN_SERVER",
                    model_uri="gs://seldon-models/v1.19.0-dev/sklearn/iris",
                    children=[],
                ),
            )
        ],
    ),
)
created = sdeps.create_seldon_deployment(ns, mldeployment, action="create", message="smoke")
assert created.metadata.name == name and created.metadata.namespace == ns, created.metadata
print("created:", created.metadata.name, flush=True)

after = len(sdeps.list_seldon_deployments(ns).items or [])
assert after == before + 1, f"list has {after} items after create, expected {before + 1}"

read = sdeps.read_seldon_deployment(name, ns)
assert read.metadata.name == name, read.metadata
assert read.metadata.labels == {"team": "dev"}, read.metadata.labels
assert read.spec.predictors[0].graph.model_uri == "gs://seldon-models/v1.19.0-dev/sklearn/iris"
print("read:", read.metadata.name, flush=True)

sdeps.delete_seldon_deployment(name, ns, action="delete", message="bye")
print("deleted:", name, flush=True)
try:
    sdeps.read_seldon_deployment(name, ns)
    sys.exit("expected 404 after delete")
except ApiException as e:
    assert e.status == 404, f"read after delete: HTTP {e.status}, expected 404"

print("SDK through proxy: all checks passed", flush=True)
