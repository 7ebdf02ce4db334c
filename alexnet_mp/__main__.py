from alexnet_mp.cli import main

main()
