# about: packaging/build.sh: the .deb and .rpm, and a -2 revision of the .deb for the upgrade test
# needs:
# arm64: skip the build (test-arm64.sh's caller built the arm64 packages with packaging/build.sh)
say "build"
rm -rf "$PKG"
bash packaging/build.sh "$PKG" >"$WORK/build1.log" 2>&1 || { show "$WORK/build1.log"; die "build"; }
DEB_REVISION=2 bash packaging/build.sh --arch amd64 "$PKG/upgrade" >"$WORK/build2.log" 2>&1 || { show "$WORK/build2.log"; die "build -2"; }
find_packages || die "packaging/build.sh left no .deb, -2 .deb or .rpm in $PKG"
ok "built $(basename "$DEB"), $(basename "$DEB2"), $(basename "$RPM")"
