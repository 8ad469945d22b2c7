/*
 * A stand-in for `nvidia-smi --version` for the booted-systemd proof (packaging/test-packages.sh):
 * like the real tool it opens /dev/nvidiactl first, so the service's device policy decides
 * whether it answers. EPERM/EACCES → "Insufficient Permissions", ENOENT → no driver (both exit
 * 9, as nvidia-smi does); any other answer from the open (ENXIO from a node with no driver
 * behind it) counts as the driver answering.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(void) {
    int fd = open("/dev/nvidiactl", O_RDWR | O_CLOEXEC);
    if (fd < 0 && (errno == EPERM || errno == EACCES)) {
        puts("Failed to initialize NVML: Insufficient Permissions");
        return 9;
    }
    if (fd < 0 && errno == ENOENT) {
        puts("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.");
        return 9;
    }
    if (fd >= 0) close(fd);
    puts("NVIDIA-SMI version  : 550.54.15");
    puts("NVML version        : 550.54");
    puts("DRIVER version      : 550.54.15");
    puts("CUDA Version        : 12.4");
    return 0;
}
