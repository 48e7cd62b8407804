#!/usr/bin/env python3
"""The README's minimal-trainer code block must be the code that runs: the lines between the readme-loop markers
of examples/minimal_trainer/main.cc, dedented, equal the README's ```cpp block that follows the line
'The core loop of `examples/minimal_trainer/main.cc`'."""
import sys
import textwrap

readme_path, main_path = sys.argv[1], sys.argv[2]
main = open(main_path, encoding="utf-8").read().splitlines()
begin = next(i for i, l in enumerate(main) if l.strip() == "// [readme-loop-begin]")
end = next(i for i, l in enumerate(main) if l.strip() == "// [readme-loop-end]")
code = textwrap.dedent("\n".join(main[begin + 1:end])).splitlines()

readme = open(readme_path, encoding="utf-8").read().splitlines()
anchor = next(i for i, l in enumerate(readme) if l.startswith("The core loop of `examples/minimal_trainer/main.cc`"))
start = next(i for i in range(anchor, len(readme)) if readme[i].strip() == "```cpp")
stop = next(i for i in range(start + 1, len(readme)) if readme[i].strip() == "```")
block = readme[start + 1:stop]
if block != code:
    for n, (a, b) in enumerate(zip(block + [""] * len(code), code + [""] * len(block))):
        if a != b:
            print(f"README line {start + 2 + n} differs from {main_path}:\n  README: {a!r}\n  code:   {b!r}")
            break
    print("update README.md's block from the lines between the readme-loop markers")
    sys.exit(1)
print(f"README's minimal-trainer block matches {main_path} ({len(code)} lines)")
