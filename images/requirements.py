"""Print the project's requirements (dependencies plus the named extras) from pyproject.toml, one per line.

    python3 requirements.py pyproject.toml cpu > requirements.txt

The image builds install these in a layer of their own, keyed by this output, so that a change to the code or
to another part of pyproject.toml does not download and reinstall every dependency.
"""
import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"{pyproject}: no optional-dependencies named {', '.join(unknown)} "
                         f"(have {', '.join(optional)})")
    return list(project["dependencies"]) + [req for extra in extras for req in optional[extra]]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: requirements.py PYPROJECT EXTRAS (comma-separated, may be empty)")
    print("\n".join(requirements(sys.argv[1], [e for e in sys.argv[2].split(",") if e])))
