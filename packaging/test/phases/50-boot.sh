# about: boot a real systemd (Debian bookworm minbase, debootstrap, cached) with systemd-nspawn; the stand-in API on 127.0.0.1
# needs: packages
say "booted systemd ($ARCH)"
boot_container
