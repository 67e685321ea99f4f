#!/usr/bin/env bash
# Fetch the dashboard's browser libraries with npm (versions pinned in package-lock.json) and
# copy their built files, with their licences, into the package: the server ships them and
# never loads anything from elsewhere at run time. Run after changing package.json, then
# commit registry/server/ui/static/vendor.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --ignore-scripts
out=../registry/server/ui/static/vendor
rm -rf "$out"
mkdir -p "$out/alpine" "$out/chartjs" "$out/swagger-ui"
m=node_modules

# Alpine.js, CSP build (no eval: works under a script-src 'self' policy). The npm package has
# no licence file; Alpine is MIT (package.json) and bundles @vue/reactivity and @vue/shared.
cp "$m/@alpinejs/csp/dist/cdn.min.js" "$out/alpine/alpine-csp.min.js"
{
    echo "@alpinejs/csp $(node -p "require('./$m/@alpinejs/csp/package.json').version"): MIT"
    echo "Copyright (c) 2019-present Caleb Porzio and contributors"
    echo
    sed -n '/^Permission/,$p' "$m/@vue/reactivity/LICENSE"
    echo
    echo "Bundled: @vue/reactivity and @vue/shared"
    cat "$m/@vue/reactivity/LICENSE"
} >"$out/alpine/LICENSE"

# Chart.js (UMD build, bundles @kurkle/color).
cp "$m/chart.js/dist/chart.umd.min.js" "$out/chartjs/chart.umd.min.js"
{ cat "$m/chart.js/LICENSE.md"; echo; echo "Bundled: @kurkle/color"; cat "$m/@kurkle/color/LICENSE.md"; } \
    >"$out/chartjs/LICENSE"

# Swagger UI for /docs.
for file in swagger-ui-bundle.js swagger-ui.css favicon-32x32.png LICENSE NOTICE \
    swagger-ui-bundle.js.LICENSE.txt; do
    cp "$m/swagger-ui-dist/$file" "$out/swagger-ui/$file"
done

node -e '
const lock = require("./package-lock.json").packages;
for (const name of ["@alpinejs/csp", "chart.js", "swagger-ui-dist"])
  console.log(`${name} ${lock["node_modules/" + name].version}`);
' >"$out/VERSIONS"
cat "$out/VERSIONS"
