# mcdist-kvm demo guest: 32-bit flat protected mode, no paging, no stack.
#
# Mailbox page at guest physical 0x1000 (written by the VMM before boot):
#   +4  table base (guest physical)   +8  table entries
#   +12 fill seed                     +16 entries per clone slice
#   +24 result (written by the guest) +28 stride: bytes between entries (>= 4)
# One 32-bit entry every `stride` bytes: with a stride of one page the guest touches
# every page of the table while executing few instructions.
#
# Parent phase: fill the table with a linear congruential sequence, then
# write to port 0x10 ("clone me"). The VMM freezes the VM there. Each clone
# resumes after that instruction with its clone id in %ebx (fork's return
# value), hashes its slice with 32-bit FNV-1a over words, stores the result
# in the mailbox and reports it on port 0x11.
    .code32
    .text
    .globl _start
_start:
    mov     $0x1000, %esi
    mov     4(%esi), %edi
    mov     8(%esi), %ecx
    mov     12(%esi), %eax
fill:
    test    %ecx, %ecx
    jz      filled
    imul    $1664525, %eax, %eax
    add     $1013904223, %eax
    mov     %eax, (%edi)
    add     28(%esi), %edi
    dec     %ecx
    jmp     fill
filled:
    mov     $0x10, %dx
    out     %al, %dx
after_fork:
    mov     $0x1000, %esi
    mov     16(%esi), %ecx
    mov     %ebx, %eax
    mul     %ecx
    imul    28(%esi), %eax
    add     4(%esi), %eax
    mov     %eax, %edi
    mov     $2166136261, %eax
hash:
    test    %ecx, %ecx
    jz      done
    xor     (%edi), %eax
    imul    $16777619, %eax, %eax
    add     28(%esi), %edi
    dec     %ecx
    jmp     hash
done:
    mov     %eax, 24(%esi)
    mov     $0x11, %dx
    out     %eax, %dx
    hlt
    jmp     done
