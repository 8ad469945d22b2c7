/*
 * A stand-in for libnvidia-ml.so.1, compiled at test time and loaded through the real
 * nvml-wrapper bindings (inventory.nvml_library). It exports the functions the agent calls.
 *
 * Behaviour comes from "fake_nvml.conf" in the directory the library was loaded from, re-read
 * on every nvmlInit_v2 and nvmlDeviceGetCount_v2 so a test can change it while the agent runs:
 *
 *   init_result=9          nvmlInit_v2 returns this (9 = NVML_ERROR_DRIVER_NOT_LOADED)
 *   count=8                number of GPUs
 *   name=NVIDIA H100 80GB HBM3
 *   mem_mib=81559          total memory per GPU (MiB)
 *   driver=550.54.15
 *   cuda=12040
 *   block_secs=30          nvmlDeviceGetCount_v2 sleeps this long (a wedged GPU)
 *   crash=1                nvmlDeviceGetCount_v2 writes through a null pointer (SIGSEGV, as a
 *                          library/driver version mismatch can)
 *   lost_index=3           nvmlDeviceGetName returns NVML_ERROR_GPU_IS_LOST for this GPU
 *   mig_index=2            this GPU has MIG enabled
 *   mem_v1_result=3        nvmlDeviceGetMemoryInfo (v1) returns this (3 = NOT_SUPPORTED, as on
 *                          unified-memory GB10 / DGX Spark parts)
 *   mem_v2_result=13       nvmlDeviceGetMemoryInfo_v2 returns this (13 = FUNCTION_NOT_FOUND, as
 *                          on early R510 builds; 3 = NOT_SUPPORTED)
 *   pci_device_id=0x233010de  what nvmlDeviceGetPciInfo_v3 reports (device << 16 | vendor)
 *   pci_fail_index=4       nvmlDeviceGetPciInfo_v3 fails for this GPU (no bus id)
 *   open_devices=1         nvmlInit_v2 opens DEV/nvidiactl and DEV/nvidia0..count-1 read-write,
 *                          as libnvidia-ml does, so a sandbox's device policy matters: a
 *                          refused open (EPERM, EACCES) → NVML_ERROR_NO_PERMISSION (4), a
 *                          missing node (ENOENT) → NVML_ERROR_DRIVER_NOT_LOADED (9); any other
 *                          answer (ENXIO from a node with no driver behind it) is success
 *   dev_dir=/dev           DEV above
 *
 * Compiled with -DNO_MEMORY_V2 it does not export nvmlDeviceGetMemoryInfo_v2 at all (drivers
 * before R510); with -DNO_MEMORY_V1, not nvmlDeviceGetMemoryInfo.
 *
 * GPU health (issue 32; the block "GPU health states" below). Lists are GPU indices, "1,3":
 *   handle_lost=6          nvmlDeviceGetHandleByIndex_v2 answers NVML_ERROR_GPU_IS_LOST for GPU 6
 *                          ("Unable to determine the device handle for GPU …: GPU is lost")
 *   reset_required=4       every per-device query of GPU 4 answers NVML_ERROR_RESET_REQUIRED (16)
 *   gpu_lost=5             every per-device query of GPU 5 answers NVML_ERROR_GPU_IS_LOST (15)
 *   remap_pending=1        nvmlDeviceGetRemappedRows: isPending=1
 *   remap_failed=2         nvmlDeviceGetRemappedRows: failureOccurred=1
 *   remap_result=3         nvmlDeviceGetRemappedRows returns this for every GPU (3: pre-Ampere)
 *   retired_pending=0      nvmlDeviceGetRetiredPagesPendingStatus: NVML_FEATURE_ENABLED
 *   retired_result=3       nvmlDeviceGetRetiredPagesPendingStatus returns this (3: Ampere and later)
 *   mig_pending=6          nvmlDeviceGetMigMode: pending mode differs from the current one
 *   fabric_state=3         every GPU's fabric state (0 NOT_SUPPORTED, the default: no NVSwitch;
 *                          1 NOT_STARTED, 2 IN_PROGRESS, 3 COMPLETED)
 *   fabric_not_ready=0,1   these GPUs' fabric state is IN_PROGRESS
 *   fabric_failed=2        these GPUs' fabric state is COMPLETED with status NVML_ERROR_UNKNOWN
 *   fabric_result=3        both fabric calls return this
 * Compiled with -DNO_FABRIC it exports neither fabric call (the 470 library); with
 * -DNO_FABRIC_V, only the unversioned nvmlDeviceGetGpuFabricInfo (the 535 library).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_GPU_IS_LOST 15

static struct {
    int init_result;
    unsigned count;
    char name[96];
    unsigned long long mem_mib;
    char driver[80];
    int cuda;
    unsigned block_secs;
    int crash;
    int lost_index;
    int mig_index;
    int count_result;
    int mem_v1_result;
    int mem_v2_result;
    unsigned pci_device_id;
    int pci_fail_index;
    int open_devices;
    char dev_dir[PATH_MAX];
} cfg;

/* Bus numbers of a real 8-GPU HGX board. */
static const unsigned buses[] = {0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb};

/* ---- GPU health states (issue 32): configuration ---- */
static struct {
    unsigned long long handle_lost, reset_required, gpu_lost, remap_pending, remap_failed, retired_pending,
        mig_pending, fabric_not_ready, fabric_failed;
    int remap_result, retired_result, fabric_result;
    unsigned fabric_state;
} health;

static unsigned long long index_list(const char *v) {
    unsigned long long mask = 0;
    for (const char *p = v; *p;) {
        char *end;
        long i = strtol(p, &end, 10);
        if (end == p) break;
        if (i >= 0 && i < 64) mask |= 1ULL << i;
        p = *end == ',' ? end + 1 : end;
    }
    return mask;
}

static void health_defaults(void) { memset(&health, 0, sizeof health); }

/* 1: the key was a health key. */
static int health_config(const char *k, const char *v) {
    if (!strcmp(k, "handle_lost")) health.handle_lost = index_list(v);
    else if (!strcmp(k, "reset_required")) health.reset_required = index_list(v);
    else if (!strcmp(k, "gpu_lost")) health.gpu_lost = index_list(v);
    else if (!strcmp(k, "remap_pending")) health.remap_pending = index_list(v);
    else if (!strcmp(k, "remap_failed")) health.remap_failed = index_list(v);
    else if (!strcmp(k, "retired_pending")) health.retired_pending = index_list(v);
    else if (!strcmp(k, "mig_pending")) health.mig_pending = index_list(v);
    else if (!strcmp(k, "fabric_not_ready")) health.fabric_not_ready = index_list(v);
    else if (!strcmp(k, "fabric_failed")) health.fabric_failed = index_list(v);
    else if (!strcmp(k, "remap_result")) health.remap_result = atoi(v);
    else if (!strcmp(k, "retired_result")) health.retired_result = atoi(v);
    else if (!strcmp(k, "fabric_result")) health.fabric_result = atoi(v);
    else if (!strcmp(k, "fabric_state")) health.fabric_state = (unsigned)atoi(v);
    else return 0;
    return 1;
}

/* ---- end GPU health states configuration ---- */

static void load_config(void) {
    cfg.init_result = 0;
    cfg.count = 8;
    snprintf(cfg.name, sizeof cfg.name, "NVIDIA H100 80GB HBM3");
    cfg.mem_mib = 81559;
    snprintf(cfg.driver, sizeof cfg.driver, "550.54.15");
    cfg.cuda = 12040;
    cfg.block_secs = 0;
    cfg.crash = 0;
    cfg.lost_index = -1;
    cfg.mig_index = -1;
    cfg.count_result = 0;
    cfg.mem_v1_result = 0;
    cfg.mem_v2_result = 0;
    cfg.pci_device_id = 0x233010de;
    cfg.pci_fail_index = -1;
    cfg.open_devices = 0;
    snprintf(cfg.dev_dir, sizeof cfg.dev_dir, "/dev");
    health_defaults();

    Dl_info info;
    if (!dladdr((void *)load_config, &info) || !info.dli_fname) return;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s", info.dli_fname);
    char *slash = strrchr(path, '/');
    if (!slash) return;
    snprintf(slash + 1, sizeof path - (size_t)(slash + 1 - path), "fake_nvml.conf");
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        char *eq = strchr(line, '=');
        if (!eq) continue;
        *eq = 0;
        const char *k = line, *v = eq + 1;
        if (health_config(k, v)) continue;
        if (!strcmp(k, "init_result")) cfg.init_result = atoi(v);
        else if (!strcmp(k, "count")) cfg.count = (unsigned)atoi(v);
        else if (!strcmp(k, "name")) snprintf(cfg.name, sizeof cfg.name, "%s", v);
        else if (!strcmp(k, "mem_mib")) cfg.mem_mib = strtoull(v, NULL, 10);
        else if (!strcmp(k, "driver")) snprintf(cfg.driver, sizeof cfg.driver, "%s", v);
        else if (!strcmp(k, "cuda")) cfg.cuda = atoi(v);
        else if (!strcmp(k, "block_secs")) cfg.block_secs = (unsigned)atoi(v);
        else if (!strcmp(k, "crash")) cfg.crash = atoi(v);
        else if (!strcmp(k, "lost_index")) cfg.lost_index = atoi(v);
        else if (!strcmp(k, "mig_index")) cfg.mig_index = atoi(v);
        else if (!strcmp(k, "count_result")) cfg.count_result = atoi(v);
        else if (!strcmp(k, "mem_v1_result")) cfg.mem_v1_result = atoi(v);
        else if (!strcmp(k, "mem_v2_result")) cfg.mem_v2_result = atoi(v);
        else if (!strcmp(k, "pci_device_id")) cfg.pci_device_id = (unsigned)strtoul(v, NULL, 0);
        else if (!strcmp(k, "pci_fail_index")) cfg.pci_fail_index = atoi(v);
        else if (!strcmp(k, "open_devices")) cfg.open_devices = atoi(v);
        else if (!strcmp(k, "dev_dir")) snprintf(cfg.dev_dir, sizeof cfg.dev_dir, "%s", v);
    }
    fclose(f);
}

static int index_of(nvmlDevice_t d) { return (int)((uintptr_t)d) - 1; }

/* ---- GPU health states (issue 32): faults ---- */
static int in_list(unsigned long long mask, int i) { return i >= 0 && i < 64 && (mask >> i) & 1; }

/* The error every per-device query of this GPU answers, or 0. */
static nvmlReturn_t health_fault(nvmlDevice_t d) {
    int i = index_of(d);
    if (in_list(health.gpu_lost, i)) return NVML_ERROR_GPU_IS_LOST;
    if (in_list(health.reset_required, i)) return 16; /* NVML_ERROR_RESET_REQUIRED */
    return NVML_SUCCESS;
}
#define HEALTH_FAULT(d)                         \
    do {                                        \
        nvmlReturn_t fault_ = health_fault(d);  \
        if (fault_) return fault_;              \
    } while (0)
/* ---- end GPU health states ---- */

static nvmlReturn_t copy_str(char *dst, unsigned len, const char *src) {
    if (!dst || strlen(src) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

/* Opens one device node as libnvidia-ml does: 0, or the NVML error its errno maps to. */
static nvmlReturn_t open_node(const char *name) {
    char path[PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/%s", cfg.dev_dir, name);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd >= 0) {
        close(fd);
        return NVML_SUCCESS;
    }
    if (errno == EPERM || errno == EACCES) return 4; /* NVML_ERROR_NO_PERMISSION */
    if (errno == ENOENT) return 9;                   /* NVML_ERROR_DRIVER_NOT_LOADED */
    return NVML_SUCCESS; /* ENXIO and the like: the node is there and was not refused */
}

nvmlReturn_t nvmlInit_v2(void) {
    load_config();
    if (cfg.init_result) return cfg.init_result;
    if (cfg.open_devices) {
        nvmlReturn_t r = open_node("nvidiactl");
        for (unsigned i = 0; !r && i < cfg.count; i++) {
            char name[32];
            snprintf(name, sizeof name, "nvidia%u", i);
            r = open_node(name);
        }
        return r;
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    return copy_str(version, length, cfg.driver);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) {
    if (!v) return NVML_ERROR_INVALID_ARGUMENT;
    *v = cfg.cuda;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    load_config();
    if (cfg.block_secs) sleep(cfg.block_secs);
    if (cfg.crash) *(volatile int *)(uintptr_t)cfg.crash = 0;
    if (cfg.count_result) return (nvmlReturn_t)cfg.count_result;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = cfg.count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!device || index >= cfg.count) return NVML_ERROR_INVALID_ARGUMENT;
    if (in_list(health.handle_lost, (int)index)) return NVML_ERROR_GPU_IS_LOST; /* health */
    *device = (nvmlDevice_t)(uintptr_t)(index + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    HEALTH_FAULT(d);
    if (index_of(d) == cfg.lost_index) return NVML_ERROR_GPU_IS_LOST;
    return copy_str(name, length, cfg.name);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    HEALTH_FAULT(d);
    char buf[80];
    snprintf(buf, sizeof buf, "GPU-f00dfeed-0000-4000-8000-%012d", index_of(d));
    return copy_str(uuid, length, buf);
}

#ifndef NO_MEMORY_V2
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    HEALTH_FAULT(d);
    if (cfg.mem_v2_result) return (nvmlReturn_t)cfg.mem_v2_result;
    if (!m) return NVML_ERROR_INVALID_ARGUMENT;
    m->total = cfg.mem_mib * 1024ULL * 1024ULL;
    m->reserved = 0;
    m->used = 0;
    m->free = m->total;
    return NVML_SUCCESS;
}
#endif

#ifndef NO_MEMORY_V1
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    HEALTH_FAULT(d);
    if (cfg.mem_v1_result) return (nvmlReturn_t)cfg.mem_v1_result;
    if (!m) return NVML_ERROR_INVALID_ARGUMENT;
    m->total = cfg.mem_mib * 1024ULL * 1024ULL;
    m->used = 0;
    m->free = m->total;
    return NVML_SUCCESS;
}
#endif

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *p) {
    int i = index_of(d);
    if (!p || i < 0) return NVML_ERROR_INVALID_ARGUMENT;
    HEALTH_FAULT(d);
    if (i == cfg.pci_fail_index) return 999; /* NVML_ERROR_UNKNOWN */
    unsigned bus = buses[(unsigned)i % 8] + (unsigned)i / 8;
    memset(p, 0, sizeof *p);
    p->domain = 0;
    p->bus = bus;
    p->device = 0;
    p->pciDeviceId = cfg.pci_device_id;
    p->pciSubSystemId = 0x16c110de;
    snprintf(p->busId, sizeof p->busId, "00000000:%02X:00.0", bus);
    snprintf(p->busIdLegacy, sizeof p->busIdLegacy, "0000:%02X:00.0", bus);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned int *current, unsigned int *pending) {
    if (!current || !pending) return NVML_ERROR_INVALID_ARGUMENT;
    HEALTH_FAULT(d);
    *current = *pending = (index_of(d) == cfg.mig_index) ? 1 : 0;
    if (in_list(health.mig_pending, index_of(d))) *pending = !*current;
    return NVML_SUCCESS;
}

/* ---- GPU health states (issue 32): the checks, with nvml.h's signatures and layouts ---- */
nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t d, unsigned int *corrRows,
                                       unsigned int *uncRows, unsigned int *isPending,
                                       unsigned int *failureOccurred) {
    if (!corrRows || !uncRows || !isPending || !failureOccurred) return NVML_ERROR_INVALID_ARGUMENT;
    HEALTH_FAULT(d);
    if (health.remap_result) return (nvmlReturn_t)health.remap_result;
    int i = index_of(d);
    *isPending = (unsigned)in_list(health.remap_pending, i);
    *failureOccurred = (unsigned)in_list(health.remap_failed, i);
    *corrRows = *isPending ? 1 : 0;
    *uncRows = *failureOccurred ? 512 : 0;
    return NVML_SUCCESS;
}

/* nvmlEnableState_t: NVML_FEATURE_DISABLED 0, NVML_FEATURE_ENABLED 1. */
nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t d, int *isPending) {
    if (!isPending) return NVML_ERROR_INVALID_ARGUMENT;
    HEALTH_FAULT(d);
    if (health.retired_result) return (nvmlReturn_t)health.retired_result;
    *isPending = in_list(health.retired_pending, index_of(d));
    return NVML_SUCCESS;
}

#ifndef NO_FABRIC
typedef unsigned char nvmlGpuFabricState_t;
typedef struct {
    unsigned char clusterUuid[16];
    nvmlReturn_t status;
    unsigned int cliqueId;
    nvmlGpuFabricState_t state;
} nvmlGpuFabricInfo_t;

static nvmlReturn_t fabric_of(nvmlDevice_t d, nvmlReturn_t *status, nvmlGpuFabricState_t *state) {
    HEALTH_FAULT(d);
    if (health.fabric_result) return (nvmlReturn_t)health.fabric_result;
    int i = index_of(d);
    *status = NVML_SUCCESS;
    *state = (nvmlGpuFabricState_t)health.fabric_state;
    if (in_list(health.fabric_not_ready, i)) *state = 2; /* IN_PROGRESS */
    if (in_list(health.fabric_failed, i)) {
        *state = 3; /* COMPLETED */
        *status = 999; /* NVML_ERROR_UNKNOWN */
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetGpuFabricInfo(nvmlDevice_t d, nvmlGpuFabricInfo_t *info) {
    if (!info) return NVML_ERROR_INVALID_ARGUMENT;
    memset(info, 0, sizeof *info);
    return fabric_of(d, &info->status, &info->state);
}

#ifndef NO_FABRIC_V
typedef struct {
    unsigned int version;
    unsigned char clusterUuid[16];
    nvmlReturn_t status;
    unsigned int cliqueId;
    nvmlGpuFabricState_t state;
    unsigned int healthMask;
} nvmlGpuFabricInfo_v2_t;
#define nvmlGpuFabricInfo_v2 (unsigned int)(sizeof(nvmlGpuFabricInfo_v2_t) | (2 << 24U))

/* As the real library: a version it does not know is NVML_ERROR_ARGUMENT_VERSION_MISMATCH. */
nvmlReturn_t nvmlDeviceGetGpuFabricInfoV(nvmlDevice_t d, nvmlGpuFabricInfo_v2_t *info) {
    if (!info) return NVML_ERROR_INVALID_ARGUMENT;
    if (info->version != nvmlGpuFabricInfo_v2) return 25; /* ARGUMENT_VERSION_MISMATCH */
    unsigned int version = info->version;
    memset(info, 0, sizeof *info);
    info->version = version;
    return fabric_of(d, &info->status, &info->state);
}
#endif
#endif
/* ---- end GPU health states ---- */
