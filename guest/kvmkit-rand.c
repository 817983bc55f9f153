/*
 * kvmkit-rand: pseudo-random bytes from a seed, for the integration tests'
 * "file of known random content".
 *
 *   kvmkit-rand SEED BYTES > FILE
 *
 * Writes BYTES bytes of the splitmix64 stream started at SEED (decimal or
 * 0x-hex), each 64-bit output little-endian.  tests/integration/guest.py has
 * the same generator, so the host knows what the guest wrote.
 *
 * Why not /dev/urandom: on the project's nested CI host every guest kernel
 * instruction is emulated, and the kernel's ChaCha20 makes `dd
 * if=/dev/urandom bs=64k count=16` take about 50 s; this computes in user
 * mode and enters the kernel once per 64 KiB written.
 *
 * Built by guest/build-kit with gcc -static -nostdlib (a few KiB: the
 * initramfs every test guest unpacks stays small).
 */

typedef unsigned long u64;

static long sys3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return ret;
}

#define SYS_write 1
#define SYS_exit_group 231

static void put(int fd, const char *s)
{
	long n = 0;
	while (s[n])
		n++;
	sys3(SYS_write, fd, (long)s, n);
}

static __attribute__((noreturn)) void leave(int status)
{
	for (;;)
		sys3(SYS_exit_group, status, 0, 0);
}

/* A whole decimal or 0x-hex number below 2^64; 0 = not a number. */
static int number(const char *s, u64 *out)
{
	u64 v = 0, base = 10;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		return 0;
	for (; *s; s++) {
		u64 d;
		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			return 0;
		if (d >= base || v > (~0UL - d) / base)
			return 0;
		v = v * base + d;
	}
	*out = v;
	return 1;
}

static unsigned char buf[65536];

__attribute__((noreturn, used)) void kvmkit_rand_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	u64 state, left;
	if (argc != 3 || !number(argv[1], &state) || !number(argv[2], &left)) {
		put(2, "usage: kvmkit-rand SEED BYTES  (SEED decimal or 0x-hex; writes BYTES bytes to stdout)\n");
		leave(2);
	}
	while (left) {
		u64 n = left < sizeof(buf) ? left : sizeof(buf);
		for (u64 i = 0; i < n; i += 8) {
			u64 z = (state += 0x9e3779b97f4a7c15UL);
			z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
			z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
			z ^= z >> 31;
			for (int b = 0; b < 8; b++)
				buf[i + b] = (unsigned char)(z >> (8 * b));
		}
		for (u64 done = 0; done < n;) {
			long w = sys3(SYS_write, 1, (long)(buf + done), n - done);
			if (w == -4)            /* EINTR */
				continue;
			if (w <= 0) {
				put(2, "kvmkit-rand: write to stdout failed\n");
				leave(1);
			}
			done += w;
		}
		left -= n;
	}
	leave(0);
}

/* The kernel starts us with argc, argv... on the stack and no return address. */
__asm__(".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call kvmkit_rand_main\n");
